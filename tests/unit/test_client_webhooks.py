"""Webhook verification in the SDK and ``zimage webhooks verify``: a request signed the Standard Webhooks way
verifies; a changed body, a wrong secret, a missing header or a stale timestamp does not."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from standardwebhooks.webhooks import Webhook
from typer.testing import CliRunner

from zimage_client import InvalidWebhook, verify_webhook
from zimage_client.cli import app

SECRET = "whsec_" + base64.b64encode(b"a secret of thirty-two bytes!!!!").decode()
BODY = json.dumps({"type": "job.succeeded", "data": {"id": "job_1", "status": "succeeded"}}).encode()


def _headers(body: bytes = BODY, at: datetime | None = None, secret: str = SECRET) -> dict[str, str]:
    at = at or datetime.now(UTC)
    signature = Webhook(secret).sign("msg_1", at, body.decode())
    return {"Webhook-Id": "msg_1", "Webhook-Timestamp": str(int(at.timestamp())), "Webhook-Signature": signature}


def test_a_genuine_webhook_verifies_and_returns_its_payload() -> None:
    assert verify_webhook(SECRET, BODY, _headers())["data"]["id"] == "job_1"


@pytest.mark.parametrize(
    ("body", "headers"),
    [
        (BODY.replace(b"succeeded", b"failed"), _headers()),  # the body was changed
        (BODY, _headers(secret="whsec_" + base64.b64encode(b"another secret").decode())),
        (BODY, {k: v for k, v in _headers().items() if k != "Webhook-Id"}),
        (BODY, {**_headers(), "Webhook-Signature": "v1,not base64!"}),
        (BODY, _headers(at=datetime.now(UTC) - timedelta(minutes=10))),  # a replay
    ],
)
def test_anything_else_is_refused(body: bytes, headers: dict[str, str]) -> None:
    with pytest.raises(InvalidWebhook):
        verify_webhook(SECRET, body, headers)


def test_a_saved_request_verifies_without_the_clock_check() -> None:
    old = _headers(at=datetime.now(UTC) - timedelta(days=2))
    assert verify_webhook(SECRET, BODY, old, check_timestamp=False)["type"] == "job.succeeded"
    with pytest.raises(InvalidWebhook):
        verify_webhook(SECRET, BODY + b" ", old, check_timestamp=False)


def test_the_cli_verifies_headers_and_body_or_a_saved_request(tmp_path: Path) -> None:
    runner = CliRunner()
    body = tmp_path / "body.json"
    body.write_bytes(BODY)
    flags = [arg for name, value in _headers().items() for arg in ("-H", f"{name}: {value}")]
    ok = runner.invoke(app, ["webhooks", "verify", "--secret", SECRET, "--body", str(body), *flags])
    assert ok.exit_code == 0, ok.output
    assert '"job_1"' in ok.stdout

    saved = tmp_path / "request.http"
    head = "".join(f"{k}: {v}\r\n" for k, v in _headers(at=datetime.now(UTC) - timedelta(hours=1)).items())
    saved.write_bytes(b"POST /hooks/zimage HTTP/1.1\r\n" + head.encode() + b"\r\n" + BODY)
    args = ["webhooks", "verify", "--secret", SECRET, "--request", str(saved)]
    stale = runner.invoke(app, args)
    assert (stale.exit_code, stale.exception.__class__) == (1, SystemExit)  # an hour old: refused as a replay...
    assert runner.invoke(app, [*args, "--no-check-timestamp"]).exit_code == 0  # ...unless asked not to
    assert runner.invoke(app, ["webhooks", "verify", "--secret", SECRET]).exit_code == 2  # neither --body nor --request
