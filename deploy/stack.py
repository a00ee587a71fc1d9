"""The local stack: SeaweedFS, the API, one worker and the webhook delivery process as child processes, for
``make up``/``down``/``demo`` and the end-to-end tests. Postgres and Redis are the machine's own (already running
on their usual ports).

    python -m deploy.stack up      # start in the background, write .run/env, return once /readyz is 200
    python -m deploy.stack down    # stop exactly what `up` started
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from sqlalchemy import text

from core import storage
from core.admin import create_key, migrate
from core.db import make_engine
from core.settings import Settings
from worker.webhooks import READY

ROOT = Path(__file__).resolve().parent.parent
TINY_EDIT = "checkpoints/tiny/edit"
TINY_BASE = "checkpoints/tiny/base"


class StackError(RuntimeError):
    """A part of the stack did not start; the message names it and ends with its log tail."""


@dataclass
class Stack:
    """Child processes making one service: each in its own process group, logs under ``run_dir/logs``."""

    settings: Settings
    run_dir: Path
    api_port: int = 8000
    s3_port: int | None = 8333  # None: S3 is external (settings.s3_endpoint_url), start no SeaweedFS
    worker_queues: str = "generate,edit,base"  # Turbo, Edit and Base (each loaded only when its model is set)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    # Each worker's metrics port: a free one each, so workers (and test runs) sharing a host never collide.
    metrics_ports: dict[str, int] = field(default_factory=dict)

    @property
    def api_url(self) -> str:
        """Where the API listens."""
        return f"http://127.0.0.1:{self.api_port}"

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ZIMAGE_")}
        env.update(self.settings.as_env())
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        logs = self.run_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        with open(logs / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(
                argv,
                cwd=ROOT,
                env={**self._env(), **(env or {})},
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own process group: stopping it stops its children too
            )
        self.procs[name] = proc
        return proc

    def log_tail(self, name: str, lines: int = 30) -> str:
        """The last lines of a part's log."""
        path = self.run_dir / "logs" / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def start_s3(self, timeout_s: float = 60.0) -> None:
        """Start SeaweedFS on loopback (when ``s3_port`` is set) and wait for its bucket."""
        if self.s3_port is None:
            return
        s = self.settings
        self._spawn(
            "s3",
            [
                sys.executable,
                "-m",
                "deploy.seaweed",
                "--dir",
                str(self.run_dir / "s3"),
                "--port",
                str(self.s3_port),
                "--access-key",
                s.s3_access_key_id,
                "--secret-key",
                s.s3_secret_access_key,
                "--bucket",
                s.s3_bucket,
            ],
        )
        client = storage.make_s3_client(s)
        self._wait("s3", lambda: storage.ping(client, s.s3_bucket), timeout_s)

    def start_api(self, timeout_s: float = 30.0) -> None:
        """Start the API (uvicorn) and wait for /readyz."""
        self._spawn(
            "api",
            [
                sys.executable,
                "-m",
                "uvicorn",
                "api.main:create_app",
                "--factory",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.api_port),
                "--http",
                "api.head_limits:GuardedHttpTools",
                "--log-level",
                "warning",
                "--no-access-log",
            ],
        )

        def ready() -> bool:
            try:
                return httpx.get(f"{self.api_url}/readyz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        self._wait("api", ready, timeout_s)

    def start_worker(self, timeout_s: float = 180.0, *, name: str = "worker") -> subprocess.Popen[bytes]:
        """Start one Celery worker and wait until it has loaded its pipelines and registered as ready."""
        node = f"zimage-{secrets.token_hex(3)}@%h"
        self.metrics_ports[name] = free_port() if self.settings.metrics_port else 0
        proc = self._spawn(
            name,
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "worker.app",
                "worker",
                "--pool",
                "solo",
                "--concurrency",
                "1",
                "--queues",
                self.worker_queues,
                "--loglevel",
                "INFO",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
                "-n",
                node,
            ],
            env={"ZIMAGE_METRICS_PORT": str(self.metrics_ports[name])},
        )
        db = make_engine(self.settings, pool_size=1)

        def ready() -> bool:
            with db.connect() as conn:
                return bool(
                    conn.execute(
                        text("SELECT 1 FROM workers WHERE pid = :pid AND ready"), {"pid": proc.pid}
                    ).scalar()
                )

        try:
            self._wait(name, ready, timeout_s, probe_names_process=True)
        finally:
            db.dispose()
        return proc

    def start_webhooks(self, timeout_s: float = 30.0) -> subprocess.Popen[bytes]:
        """Start the webhook delivery process (CPU only) and wait until it listens for new deliveries."""
        proc = self._spawn("webhooks", [sys.executable, "-m", "worker.webhooks"])
        self._wait("webhooks", lambda: READY in self.log_tail("webhooks", 200), timeout_s)
        return proc

    def start(self) -> Stack:
        """Migrate, then start S3, the API, the worker and the webhook delivery process; stops what it started if
        any part fails."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            migrate(self.settings)
            self.start_s3()
            self.start_api()
            self.start_worker()
            self.start_webhooks()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait(self, name: str, probe, timeout_s: float, *, probe_names_process: bool = False) -> None:
        """Wait until ``probe()`` is true; a part that exits first failed to start.

        ``probe_names_process``: the probe asks about this very process (a worker's row holds its pid), so a
        true answer after it exited means it got ready and died later (on its first job: the caller sees that);
        a port probe could be answered by some other process, so there an exit always counts as a failure.
        """
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            exited = self.procs[name].poll() is not None
            try:
                if (probe_names_process or not exited) and probe():
                    return
            except Exception:
                pass
            if exited:
                raise StackError(f"{name} exited with {self.procs[name].returncode}:\n{self.log_tail(name)}")
            time.sleep(0.2)
        raise StackError(f"{name} not ready after {timeout_s:.0f} s:\n{self.log_tail(name)}")

    def stop(self, grace_s: float = 15.0) -> None:
        """Stop every part (workers first, S3 last): SIGTERM to each group, SIGKILL after the grace."""
        for name in [n for n in self.procs if n not in ("api", "s3")] + ["api", "s3"]:
            proc = self.procs.pop(name, None)
            if proc is not None:
                stop_group(proc.pid, grace_s, proc)

    def pids(self) -> dict[str, int]:
        """Process (and group) ids of the running parts."""
        return {name: p.pid for name, p in self.procs.items()}


def stop_group(pgid: int, grace_s: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    """SIGTERM a process group, wait up to ``grace_s``, then SIGKILL what is left."""
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            break
        if proc is None and not _alive(pgid):
            break
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
    if proc is not None:
        proc.wait(5)


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def dev_settings(run_dir: Path, *, s3_port: int = 8333, api_port: int = 8000) -> Settings:
    """Settings for a local stack: the environment's ZIMAGE_* values over the defaults, S3 on ``s3_port``."""
    base = Settings()
    overrides: dict[str, object] = {"api_base_url": f"http://127.0.0.1:{api_port}"}
    if "ZIMAGE_S3_ENDPOINT_URL" not in os.environ:
        overrides["s3_endpoint_url"] = f"http://127.0.0.1:{s3_port}"
    if "ZIMAGE_EDIT_MODEL" not in os.environ and (ROOT / TINY_EDIT / "model_index.json").exists():
        overrides["edit_model"] = TINY_EDIT  # the tiny Omni checkpoint `make checkpoint` builds
    if "ZIMAGE_BASE_MODEL" not in os.environ and (ROOT / TINY_BASE / "model_index.json").exists():
        overrides["base_model"] = TINY_BASE  # the tiny Base: the tiny Turbo's text encoder and VAE, shared
    return base.model_copy(update=overrides)


def _up(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir).resolve()
    pid_file = run_dir / "pids.json"
    if pid_file.exists() and any(_alive(p) for p in json.loads(pid_file.read_text()).values()):
        print(f"already up (see {pid_file}); run `make down` first", file=sys.stderr)
        return 1
    settings = dev_settings(run_dir, s3_port=args.s3_port, api_port=args.api_port)
    stack = Stack(settings, run_dir, api_port=args.api_port, s3_port=args.s3_port, worker_queues=args.queues)
    try:
        stack.start()
    except StackError as exc:
        print(exc, file=sys.stderr)
        return 1
    pid_file.write_text(json.dumps(stack.pids()))
    key = create_key(settings, args.tenant)
    (run_dir / "env").write_text(f"ZIMAGE_API_URL={stack.api_url}\nZIMAGE_API_KEY={key}\n")
    print(f"up: API {stack.api_url}, S3 {settings.s3_endpoint_url}; credentials in {run_dir / 'env'}")
    return 0


def _down(args: argparse.Namespace) -> int:
    pid_file = Path(args.run_dir).resolve() / "pids.json"
    if not pid_file.exists():
        print("nothing to stop", file=sys.stderr)
        return 0
    for name in ("webhooks", "worker", "api", "s3"):
        pid = json.loads(pid_file.read_text()).get(name)
        if pid is not None:
            stop_group(pid, 15.0)
            print(f"stopped {name} ({pid})")
    pid_file.unlink()
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m deploy.stack up|down``."""
    parser = argparse.ArgumentParser(
        prog="python -m deploy.stack",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", choices=["up", "down"])
    parser.add_argument("--run-dir", default=str(ROOT / ".run"))
    parser.add_argument("--api-port", type=int, default=8000)
    parser.add_argument("--s3-port", type=int, default=8333)
    parser.add_argument("--queues", default="generate,edit,base")
    parser.add_argument("--tenant", default="local")
    args = parser.parse_args(argv)
    return _up(args) if args.command == "up" else _down(args)


if __name__ == "__main__":
    raise SystemExit(main())
