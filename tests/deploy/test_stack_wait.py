"""The stack's start-up wait: a part that exits before it is ready failed, and a worker that got ready and then
died on its first job (a poison job) did start."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from core.settings import Settings
from deploy.stack import Stack, StackError


def exited_stack(tmp_path: Path) -> Stack:
    stack = Stack(Settings(), tmp_path)
    proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(70)"])
    proc.wait(timeout=30)
    stack.procs["part"] = proc
    return stack


def test_a_part_that_exits_before_it_is_ready_failed(tmp_path: Path) -> None:
    with pytest.raises(StackError, match="part exited with 70"):
        exited_stack(tmp_path)._wait("part", lambda: False, 5)


def test_a_port_probe_answered_after_the_part_exited_is_someone_else(tmp_path: Path) -> None:
    with pytest.raises(StackError, match="part exited with 70"):
        exited_stack(tmp_path)._wait("part", lambda: True, 5)


def test_a_worker_that_got_ready_then_died_did_start(tmp_path: Path) -> None:
    exited_stack(tmp_path)._wait("part", lambda: True, 5, probe_names_process=True)
