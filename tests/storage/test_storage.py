"""core.storage against a real SeaweedFS: checked puts, presigned GETs, credentials, deletes, ping."""

from __future__ import annotations

import base64
import hashlib
import os
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from botocore.exceptions import ClientError

from core.settings import Settings
from core.storage import (
    S3Client,
    StorageError,
    abort_multipart,
    complete_multipart,
    delete_keys,
    ensure_bucket,
    make_s3_client,
    object_sha256,
    ping,
    presign_get,
    put_object_checked,
    result_key,
    start_multipart,
    upload_key,
    upload_part_checked,
)
from deploy.seaweed import SeaweedServer


@pytest.fixture(scope="module")
def settings(s3_settings_overrides: dict[str, Any]) -> Settings:
    return Settings(**s3_settings_overrides)


@pytest.fixture(scope="module")
def client(settings: Settings) -> Iterator[S3Client]:
    c = make_s3_client(settings)
    yield c
    c.close()


@pytest.fixture(scope="module")
def public_client(settings: Settings) -> Iterator[S3Client]:
    c = make_s3_client(settings, public=True)
    yield c
    c.close()


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(trust_env=False, timeout=10) as c:
        yield c


def _key(name: str) -> str:
    return f"tests/{os.urandom(6).hex()}/{name}"


def test_keys_have_the_documented_layout() -> None:
    assert result_key("ten_1", "job_2", 0, "png") == "results/ten_1/job_2/0.png"
    assert result_key("ten_1", "job_2", 3, "webp") == "results/ten_1/job_2/3.webp"
    assert upload_key("ten_1", "upl_9", "jpg") == "uploads/ten_1/upl_9.jpg"


@pytest.mark.parametrize(
    ("tenant", "job", "index", "ext"),
    [
        ("a/b", "job", 0, "png"),
        ("ten", "..", 0, "png"),
        ("ten", "", 0, "png"),
        ("ten", "job", -1, "png"),
        ("ten", "job", 0, ".png"),
        ("ten", "job", 0, "PNG"),
    ],
)
def test_keys_refuse_segments_that_could_escape_their_prefix(
    tenant: str, job: str, index: int, ext: str
) -> None:
    with pytest.raises(ValueError):
        result_key(tenant, job, index, ext)


def test_put_then_presigned_get_returns_the_same_bytes(
    settings: Settings, client: S3Client, public_client: S3Client, http: httpx.Client
) -> None:
    data = os.urandom(300_000)
    key = result_key("ten_a", "job_b", 0, "png")
    digest = put_object_checked(client, settings.s3_bucket, key, data, "image/png", {"seed": "42"})
    assert digest == hashlib.sha256(data).hexdigest()

    before = datetime.now(UTC)
    url, expires_at = presign_get(public_client, settings.s3_bucket, key, 600)
    assert url.startswith(settings.presign_endpoint or "")
    assert "X-Amz-Expires=600" in url
    assert before + timedelta(seconds=598) <= expires_at <= before + timedelta(seconds=601)
    assert expires_at.tzinfo is UTC

    response = http.get(url)
    assert response.status_code == 200
    assert response.content == data
    assert response.headers["content-type"] == "image/png"
    assert object_sha256(client, settings.s3_bucket, key) == digest
    head = client.head_object(Bucket=settings.s3_bucket, Key=key, ChecksumMode="ENABLED")
    assert head["Metadata"] == {"seed": "42"}
    # The checksum was sent and stored, not just computed locally.
    assert head["ChecksumSHA256"] == base64.b64encode(bytes.fromhex(digest)).decode()


def test_presigned_url_with_a_changed_key_or_past_its_expiry_is_refused(
    settings: Settings, client: S3Client, public_client: S3Client, http: httpx.Client
) -> None:
    key = _key("a.bin")
    put_object_checked(client, settings.s3_bucket, key, b"secret", "application/octet-stream")
    put_object_checked(client, settings.s3_bucket, key + "2", b"other", "application/octet-stream")
    url, _ = presign_get(public_client, settings.s3_bucket, key, 1)
    assert http.get(url.replace(key, key + "2")).status_code == 403
    time.sleep(2.1)
    assert http.get(url).status_code == 403


def test_presign_ttl_is_bounded(settings: Settings, public_client: S3Client) -> None:
    with pytest.raises(ValueError):
        presign_get(public_client, settings.s3_bucket, "k", 0)
    with pytest.raises(ValueError):
        presign_get(public_client, settings.s3_bucket, "k", 7 * 24 * 3600 + 1)


def test_server_refuses_a_wrong_sha256_and_stores_nothing(settings: Settings, client: S3Client) -> None:
    key = _key("bad.bin")
    wrong = base64.b64encode(hashlib.sha256(b"something else").digest()).decode()
    with pytest.raises(ClientError) as info:
        client.put_object(Bucket=settings.s3_bucket, Key=key, Body=b"payload", ChecksumSHA256=wrong)
    assert info.value.response["Error"]["Code"] == "BadDigest"
    with pytest.raises(ClientError) as missing:
        client.head_object(Bucket=settings.s3_bucket, Key=key)
    assert missing.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404


def test_a_multipart_upload_stores_its_parts_in_order_each_checked(settings: Settings, client: S3Client) -> None:
    key, bucket = _key("big.bin"), settings.s3_bucket
    parts = [os.urandom(5 << 20), os.urandom(123)]  # every part but the last at least 5 MiB
    upload = start_multipart(client, bucket, key, "application/octet-stream")
    sent = [upload_part_checked(client, bucket, key, upload, n, data) for n, data in enumerate(parts, 1)]
    complete_multipart(client, bucket, key, upload, sent)
    assert object_sha256(client, bucket, key) == hashlib.sha256(b"".join(parts)).hexdigest()
    head = client.head_object(Bucket=bucket, Key=key)
    assert head["ETag"].endswith('-2"') and head["ContentType"] == "application/octet-stream"


def test_an_aborted_multipart_upload_leaves_nothing(settings: Settings, client: S3Client) -> None:
    key, bucket = _key("dropped.bin"), settings.s3_bucket
    upload = start_multipart(client, bucket, key, "application/octet-stream")
    upload_part_checked(client, bucket, key, upload, 1, b"x" * 1000)
    abort_multipart(client, bucket, key, upload)
    with pytest.raises(ClientError):
        client.head_object(Bucket=bucket, Key=key)
    pending = client.list_multipart_uploads(Bucket=bucket, Prefix=key).get("Uploads") or []
    assert [u for u in pending if u["UploadId"] == upload] == []
    with pytest.raises(StorageError):  # the upload is gone: completing it fails
        complete_multipart(client, bucket, key, upload, [])


def test_a_part_whose_checksum_does_not_match_is_refused(settings: Settings, client: S3Client) -> None:
    key, bucket = _key("corrupt.bin"), settings.s3_bucket
    upload = start_multipart(client, bucket, key, "application/octet-stream")
    wrong = base64.b64encode(hashlib.sha256(b"other").digest()).decode()
    with pytest.raises(ClientError) as info:
        client.upload_part(Bucket=bucket, Key=key, UploadId=upload, PartNumber=1, Body=b"data", ChecksumSHA256=wrong)
    assert info.value.response["Error"]["Code"] == "BadDigest"
    abort_multipart(client, bucket, key, upload)


@pytest.mark.parametrize("which", ["secret", "access_key"])
def test_wrong_credentials_are_refused(
    settings: Settings, s3_settings_overrides: dict[str, Any], which: str
) -> None:
    field = "s3_secret_access_key" if which == "secret" else "s3_access_key_id"
    bad = make_s3_client(Settings(**{**s3_settings_overrides, field: "wrong-" + os.urandom(4).hex()}))
    try:
        with pytest.raises(StorageError) as info:
            put_object_checked(bad, settings.s3_bucket, _key("x.bin"), b"x", "application/octet-stream")
        assert info.value.s3_code in {"SignatureDoesNotMatch", "InvalidAccessKeyId"}
        assert info.value.status == 403
        assert not info.value.transient
        assert not ping(bad, settings.s3_bucket)
    finally:
        bad.close()


def test_anonymous_get_is_refused(settings: Settings, client: S3Client, http: httpx.Client) -> None:
    key = _key("private.bin")
    put_object_checked(client, settings.s3_bucket, key, b"private", "application/octet-stream")
    assert http.get(f"{settings.s3_endpoint_url}/{settings.s3_bucket}/{key}").status_code == 403


def test_delete_keys_removes_exactly_those_keys_across_batches(settings: Settings, client: S3Client) -> None:
    prefix = _key("")
    keep, first, last = prefix + "keep", prefix + "first", prefix + "last"
    for key in (keep, first, last):
        put_object_checked(client, settings.s3_bucket, key, key.encode(), "text/plain")
    # More than one DeleteObjects request's worth, most of them missing: missing keys count as deleted.
    keys = [first] + [f"{prefix}missing-{i}" for i in range(1001)] + [last]
    delete_keys(client, settings.s3_bucket, keys)
    listed = client.list_objects_v2(Bucket=settings.s3_bucket, Prefix=prefix)
    assert [o["Key"] for o in listed.get("Contents", [])] == [keep]
    delete_keys(client, settings.s3_bucket, [first, last])
    delete_keys(client, settings.s3_bucket, [])


def test_missing_object_is_a_permanent_error(settings: Settings, client: S3Client) -> None:
    with pytest.raises(StorageError) as info:
        object_sha256(client, settings.s3_bucket, _key("nothing"))
    assert info.value.s3_code == "NoSuchKey"
    assert not info.value.transient


def test_ensure_bucket_is_idempotent(client: S3Client) -> None:
    bucket = f"extra-{os.urandom(4).hex()}"
    assert not ping(client, bucket)
    ensure_bucket(client, bucket)
    ensure_bucket(client, bucket)
    assert ping(client, bucket)


def test_ping_is_false_and_errors_transient_once_the_server_stops(tmp_path: Path) -> None:
    server = SeaweedServer(
        tmp_path / "short", access_key="short-ak", secret_key="short-sk", bucket="short-lived"
    )
    with server:
        overrides: dict[str, Any] = {
            "s3_endpoint_url": server.endpoint_url,
            "s3_bucket": server.bucket,
            "s3_access_key_id": server.access_key,
            "s3_secret_access_key": server.secret_key,
        }
        settings = Settings(**overrides)
        client = make_s3_client(settings, timeout_s=2, attempts=1)
        assert ping(client, settings.s3_bucket)
    try:
        started = time.monotonic()
        assert not ping(client, settings.s3_bucket)
        assert time.monotonic() - started < 3
        with pytest.raises(StorageError) as info:
            put_object_checked(client, settings.s3_bucket, "k", b"x", "text/plain")
        assert info.value.transient
        assert info.value.s3_code is None
    finally:
        client.close()
