"""The state machine's shape: what holds of the table whatever its edges. What each write path may do is
tested against Postgres in tests/lifecycle/test_gate.py, by asking the table, not by restating it."""

from __future__ import annotations

import pytest

from core.status import ACTIVE, HELD, TERMINAL, TRANSITIONS, JobStatus, can_move, is_terminal, sources_of


def test_the_statuses_are_those_of_the_api() -> None:
    assert {s.value for s in JobStatus} == {"queued", "running", "succeeded", "failed", "canceled"}
    assert set(TRANSITIONS) == set(JobStatus)


def test_terminal_and_active_split_the_statuses() -> None:
    assert set(JobStatus) == TERMINAL | ACTIVE
    assert not TERMINAL & ACTIVE
    assert HELD in ACTIVE


@pytest.mark.parametrize("status", sorted(TERMINAL))
def test_a_terminal_status_never_moves_again(status: JobStatus) -> None:
    assert is_terminal(status) and is_terminal(status.value)
    assert not any(can_move(status, dst) for dst in JobStatus)


def test_every_status_is_reachable_from_queued_and_every_active_one_can_end() -> None:
    seen, frontier = {JobStatus.QUEUED}, [JobStatus.QUEUED]
    while frontier:
        for dst in TRANSITIONS[frontier.pop()]:
            if dst not in seen:
                seen.add(dst)
                frontier.append(dst)
    assert seen == set(JobStatus)
    assert all(TRANSITIONS[s] & TERMINAL for s in ACTIVE)


def test_sources_of_agrees_with_can_move() -> None:
    for dst in JobStatus:
        got = sources_of(dst)
        assert set(got) == {src.value for src in JobStatus if can_move(src, dst)}
        assert len(got) == len(set(got)) and all(type(s) is str for s in got)


def test_an_unknown_status_is_an_error() -> None:
    with pytest.raises(ValueError):
        is_terminal("paused")
