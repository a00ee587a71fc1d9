"""``zimage-admin`` for tenants and keys: list-tenants, list-keys, rotate-key, revoke-key, set-limits; and a
revocation reaching every API process at once (two app instances, each with the key cached)."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterator

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, text

from api.auth import KeyCache
from api.main import create_app
from core import admin, apikeys
from core.settings import Settings
from tests.helpers.api import auth


@pytest.fixture
def two_apps(settings: Settings) -> Iterator[tuple[TestClient, TestClient]]:
    """Two API processes' worth of app on the same database and Redis, each with its own key cache."""
    with (
        TestClient(create_app(settings, run_sweeper=False)) as one,
        TestClient(create_app(settings, run_sweeper=False)) as two,
    ):
        # both subscribed to revocations before the test revokes anything
        _wait(lambda: all(_keys(c).listening.is_set() for c in (one, two)))
        yield one, two


def _keys(c: TestClient) -> KeyCache:
    return c.app.state.resources.keys  # type: ignore[attr-defined]


def _wait(condition: Callable[[], bool], timeout_s: float = 2.0) -> float:
    """Seconds until ``condition`` held (fails past ``timeout_s``)."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout_s, "not within the time"
        time.sleep(0.005)
    return time.monotonic() - start


def _status(c: TestClient, key: str) -> int:
    return c.get("/v1/jobs", headers=auth(key)).status_code


def _run(argv: list[str], capsys: pytest.CaptureFixture[str], settings: Settings) -> tuple[int, str, str]:
    """``zimage-admin argv`` against this run's settings: exit code, stdout, stderr."""
    env = settings.as_env()
    with pytest.MonkeyPatch.context() as mp:
        for name, value in env.items():
            mp.setenv(name, value)
        code = admin.main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_a_revoked_key_is_refused_by_every_api_process_at_once(
    two_apps: tuple[TestClient, TestClient], new_key: Callable[..., str], settings: Settings
) -> None:
    key = new_key()
    assert all(_status(c, key) == 200 for c in two_apps)  # cached in both
    seen = [_keys(c).invalidations for c in two_apps]
    assert admin.revoke_key(settings, key)
    # told through Redis: each process drops it well before its 5 s cache entry would have expired
    took = _wait(lambda: all(_keys(c).invalidations > n for c, n in zip(two_apps, seen, strict=True)))
    assert took < 0.5
    assert [_status(c, key) for c in two_apps] == [401, 401]


def test_rotate_key_prints_a_new_key_and_revokes_the_old_after_its_grace(
    two_apps: tuple[TestClient, TestClient],
    new_key: Callable[..., str],
    settings: Settings,
    capsys: pytest.CaptureFixture[str],
) -> None:
    name = f"rotate-{secrets.token_hex(4)}"
    old = new_key(name)
    assert all(_status(c, old) == 200 for c in two_apps)
    code, out, err = _run(["rotate-key", "--tenant", name, "--grace", "1"], capsys, settings)
    assert code == 0
    new = out.strip()
    assert new.startswith("zk_") and new != old and "1 earlier key(s) stop working in 1 s" in err
    assert all(_status(c, new) == 200 for c in two_apps)
    assert all(_status(c, old) == 200 for c in two_apps)  # within its grace
    time.sleep(1.2)
    assert [_status(c, old) for c in two_apps] == [401, 401]
    assert all(_status(c, new) == 200 for c in two_apps)
    # without a grace the previous key stops at once, everywhere
    code, out, _ = _run(["rotate-key", "--tenant", name], capsys, settings)
    newest = out.strip()
    _wait(lambda: all(_status(c, new) == 401 for c in two_apps), timeout_s=0.5)
    assert all(_status(c, newest) == 200 for c in two_apps)


def test_list_keys_shows_prefixes_never_keys(
    new_key: Callable[..., str], settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    name = f"keys-{secrets.token_hex(4)}"
    first, second = new_key(name), new_key(name)
    keys = admin.list_keys(settings, name)
    assert keys is not None
    assert [k.prefix for k in keys] == [apikeys.display_prefix(first), apikeys.display_prefix(second)]
    assert admin.revoke_key(settings, keys[0].id)  # by id, as list-keys shows it
    code, out, _ = _run(["list-keys", "--tenant", name], capsys, settings)
    assert code == 0
    assert first not in out and second not in out
    lines = out.rstrip("\n").split("\n")
    assert lines[0].split("\t") == ["id", "prefix", "created", "revoked"]
    assert lines[1].split("\t")[3] and not lines[2].split("\t")[3]  # the first revoked, the second not
    assert _run(["list-keys", "--tenant", "nobody-here"], capsys, settings)[0] == 1


def test_keys_carry_a_visible_prefix_and_256_random_bits() -> None:
    key = apikeys.new_key()
    assert key.startswith("zk_") and len(key) == 3 + 43
    assert apikeys.display_prefix(key) == key[:10]
    assert len({apikeys.new_key() for _ in range(1000)}) == 1000
    assert apikeys.hash_key(key) != key and len(apikeys.hash_key(key)) == 64


def test_set_limits_and_list_tenants(
    new_key: Callable[..., str], settings: Settings, db: Engine, capsys: pytest.CaptureFixture[str]
) -> None:
    name = f"limits-{secrets.token_hex(4)}"
    new_key(name)
    argv = ["set-limits", "--tenant", name, "--rps", "20", "--max-queued", "500", "--images-per-day", "0"]
    assert _run(argv, capsys, settings)[0] == 0
    with db.connect() as conn:
        row = conn.execute(
            text(
                "SELECT rate_limit_rps, max_queued_jobs, max_batch_jobs, max_images_per_day FROM tenants"
                " WHERE name = :n"
            ),
            {"n": name},
        ).one()
    assert tuple(row) == (20, 500, None, 0)
    assert _run(["set-limits", "--tenant", name, "--rps", "default", "--max-batch", "100"], capsys, settings)[0] == 0
    code, out, _ = _run(["list-tenants"], capsys, settings)
    assert code == 0
    header, *rows = [line.split("\t") for line in out.strip().splitlines()]
    assert header[:8] == ["name", "id", "weight", "rps", "max_queued", "max_batch", "images_per_day", "active_keys"]
    mine = next(r for r in rows if r[0] == name)
    assert mine[2:8] == ["1", "default", "500", "100", "0", "1"]
    with pytest.raises(SystemExit) as exited:
        _run(["set-limits", "--tenant", name, "--rps", "-1"], capsys, settings)
    assert exited.value.code == 2
    assert _run(["set-limits", "--tenant", "nobody-here", "--rps", "1"], capsys, settings)[0] == 1
