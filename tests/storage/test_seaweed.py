"""deploy.seaweed: local SeaweedFS servers start fast, never collide, and never outlive their owner."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from core.storage import S3Client, StorageError, object_sha256, ping, put_object_checked, s3_client
from deploy.seaweed import (
    GRPC_OFFSET,
    SeaweedPorts,
    SeaweedServer,
    SeaweedStartError,
    pick_ports,
    remove_stale_sockets,
)

REPO = Path(__file__).resolve().parents[2]


def _client(server: SeaweedServer) -> S3Client:
    return s3_client(
        server.endpoint_url,
        region="us-east-1",
        access_key_id=server.access_key,
        secret_access_key=server.secret_key,
        timeout_s=5,
        attempts=1,
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0) but is no longer running.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def _group_exists(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _wait_gone(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.05)
    return False


def _server(data_dir: Path, weed: str | None = None) -> SeaweedServer:
    # The same credentials and bucket for every server here: isolation must come from ports and dirs alone.
    return SeaweedServer(
        data_dir, access_key="seaweed-ak", secret_key="seaweed-sk", bucket="same-bucket", weed=weed
    )


def test_session_server_serves_its_bucket(s3_server: SeaweedServer) -> None:
    client = _client(s3_server)
    try:
        assert ping(client, s3_server.bucket)
        assert s3_server.startup_s is not None and s3_server.startup_s < 15
    finally:
        client.close()


def test_two_servers_at_once_do_not_collide(tmp_path: Path) -> None:
    servers = [_server(tmp_path / name) for name in ("a", "b")]
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(SeaweedServer.start, servers))
    a, b = servers
    try:
        assert a.ports is not None and b.ports is not None
        assert not set(a.ports.all()) & set(b.ports.all())
        ca, cb = _client(a), _client(b)
        try:
            digest = put_object_checked(ca, a.bucket, "only-in-a", b"a", "text/plain")
            assert object_sha256(ca, a.bucket, "only-in-a") == digest
            with pytest.raises(StorageError) as info:
                object_sha256(cb, b.bucket, "only-in-a")
            assert info.value.s3_code == "NoSuchKey"
        finally:
            ca.close()
            cb.close()
    finally:
        a.stop()
        b.stop()


def test_stop_leaves_no_process_and_frees_every_port(tmp_path: Path) -> None:
    server = _server(tmp_path / "s").start()
    pid, ports = server.pid, server.ports
    assert pid is not None and ports is not None
    assert all(_listening(p) for p in (ports.s3, ports.s3 + GRPC_OFFSET, ports.admin + GRPC_OFFSET))
    server.stop()
    assert not server.running
    assert not _alive(pid)
    assert not _group_exists(pid)
    assert not any(_listening(p) for p in ports.all())
    assert not list(Path("/tmp").glob(f"seaweedfs-*-{ports.s3 + GRPC_OFFSET}.sock"))
    server.stop()  # idempotent


def test_a_weed_that_dies_at_startup_raises_with_its_log_tail(tmp_path: Path) -> None:
    fake = tmp_path / "weed"
    fake.write_text("#!/bin/sh\necho 'fake weed: marker-7781' >&2\nexit 3\n")
    fake.chmod(0o755)
    server = _server(tmp_path / "data", weed=str(fake))
    with pytest.raises(SeaweedStartError, match=r"(?s)exited with code 3.*marker-7781"):
        server.start()
    assert not server.running


@pytest.mark.parametrize("bucket", ["b1", "Upper", "has_underscore", "-dash", "10.0.0.1"])
def test_an_invalid_bucket_name_is_refused_before_starting(tmp_path: Path, bucket: str) -> None:
    with pytest.raises(ValueError, match="bucket"):
        SeaweedServer(tmp_path, access_key="ak", secret_key="sk", bucket=bucket)


def test_a_fixed_port_in_use_is_reported(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(SeaweedStartError, match="in use"):
            pick_ports(s.getsockname()[1])


def _start_cli(tmp_path: Path, port: int) -> tuple[subprocess.Popen[str], Path]:
    pidfile = tmp_path / "weed.pid"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "deploy.seaweed",
            "--dir",
            str(tmp_path / "data"),
            "--port",
            str(port),
            "--access-key",
            "cli-ak",
            "--secret-key",
            "cli-sk",
            "--bucket",
            "cli-bucket",
            "--pidfile",
            str(pidfile),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    assert line == f"http://127.0.0.1:{port}", line
    return proc, pidfile


def _children(pid: int) -> list[int]:
    tasks = Path(f"/proc/{pid}/task")
    return [int(c) for t in tasks.iterdir() for c in (t / "children").read_text().split()]


def _ports_of(weed_pid: int) -> SeaweedPorts:
    args = Path(f"/proc/{weed_pid}/cmdline").read_bytes().decode().split("\0")
    flags = dict(a.lstrip("-").split("=", 1) for a in args if a.startswith("-") and "=" in a)
    return SeaweedPorts(
        *(int(flags[f"{name}.port"]) for name in ("s3", "master", "volume", "filer", "admin"))
    )


def test_cli_serves_until_sigterm_then_leaves_nothing(tmp_path: Path) -> None:
    port = pick_ports().s3
    proc, pidfile = _start_cli(tmp_path, port)
    try:
        assert int(pidfile.read_text()) == proc.pid
        (weed_pid,) = _children(proc.pid)
        client = s3_client(
            f"http://127.0.0.1:{port}",
            region="us-east-1",
            access_key_id="cli-ak",
            secret_access_key="cli-sk",
            timeout_s=5,
            attempts=1,
        )
        try:
            assert ping(client, "cli-bucket")
        finally:
            client.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        assert not _alive(weed_pid)
        assert not pidfile.exists()
        assert not _listening(port)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def test_weed_dies_when_its_owner_is_killed(tmp_path: Path) -> None:
    proc, _ = _start_cli(tmp_path, pick_ports().s3)
    try:
        (weed_pid,) = _children(proc.pid)
        ports = _ports_of(weed_pid)
        proc.kill()
        proc.wait()
        assert _wait_gone(weed_pid, 15), "weed outlived the process that started it"
        remove_stale_sockets(ports)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
