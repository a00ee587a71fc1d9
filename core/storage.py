"""S3-compatible object storage: object keys, checksummed puts (whole, or in parts for large files), presigned GETs,
deletes and a readiness ping.

Every failure of a call here is raised as a ``StorageError`` of the service's error tree (``core.errors``): a
``TransientStorageError`` for 5xx, throttling, timeouts and lost connections, where retrying may help.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any, TypeAlias

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionError,
    FlexibleChecksumError,
    HTTPClientError,
    IncompleteReadError,
)

from core.errors import StorageError, TransientStorageError
from core.settings import Settings

# botocore builds the client class at runtime; no stubs are installed, so the client is typed loosely.
S3Client: TypeAlias = Any

# SigV4 refuses presigned URLs that live longer than seven days.
MAX_PRESIGN_TTL_S = 7 * 24 * 3600
# DeleteObjects takes at most this many keys per request.
_DELETE_BATCH = 1000
_READ_CHUNK = 1 << 20
_SEGMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_EXT = re.compile(r"[a-z0-9]{1,8}")
_TRANSIENT_CODES = {
    "InternalError",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "ServiceUnavailable",
    "SlowDown",
    "Throttling",
    "ThrottlingException",
}
_TRANSIENT_TRANSPORT = (ConnectionError, HTTPClientError, IncompleteReadError, FlexibleChecksumError)


def s3_client(
    endpoint_url: str | None,
    *,
    region: str,
    access_key_id: str,
    secret_access_key: str,
    timeout_s: float = 30.0,
    attempts: int = 3,
    max_pool_connections: int = 10,
) -> S3Client:
    """A boto3 S3 client with path-style addressing, SigV4, bounded timeouts and standard retries."""
    config = Config(
        region_name=region,
        signature_version="s3v4",
        # Path style works against any S3-compatible server without wildcard DNS for bucket subdomains.
        s3={"addressing_style": "path"},
        connect_timeout=min(timeout_s, 5.0),
        read_timeout=timeout_s,
        retries={"mode": "standard", "total_max_attempts": attempts},
        max_pool_connections=max_pool_connections,
        # Send only the checksums we compute (SHA-256 on puts), never an extra CRC or an aws-chunked trailer.
        request_checksum_calculation="when_required",
    )
    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint_url,
        aws_access_key_id=access_key_id,
        aws_secret_access_key=secret_access_key,
        config=config,
    )


def make_s3_client(settings: Settings, *, public: bool = False, timeout_s: float = 30.0, attempts: int = 3) -> S3Client:
    """The S3 client for these settings; ``public=True`` signs for the endpoint clients reach (presigning)."""
    return s3_client(
        settings.presign_endpoint if public else settings.s3_endpoint_url,
        region=settings.s3_region,
        access_key_id=settings.s3_access_key_id,
        secret_access_key=settings.s3_secret_access_key,
        timeout_s=timeout_s,
        attempts=attempts,
        # Every upload thread holds a connection while it sends; a few spare serve presigns and reads.
        max_pool_connections=(settings.upload_threads or 4) + 4,
    )


def result_key(tenant_id: str, job_id: str, index: int, ext: str) -> str:
    """The key of a job's ``index``-th output image: ``results/<tenant>/<job>/<index>.<ext>``."""
    if index < 0:
        raise ValueError(f"image index must be >= 0, got {index}")
    return f"results/{_segment(tenant_id)}/{_segment(job_id)}/{index}.{_ext(ext)}"


def upload_key(tenant_id: str, upload_id: str, ext: str) -> str:
    """The key of an uploaded input image: ``uploads/<tenant>/<upload_id>.<ext>``."""
    return f"uploads/{_segment(tenant_id)}/{_segment(upload_id)}.{_ext(ext)}"


def adapter_key(tenant_id: str, adapter_id: str) -> str:
    """The key of an uploaded LoRA adapter: ``adapters/<tenant>/<adapter_id>.safetensors``."""
    return f"adapters/{_segment(tenant_id)}/{_segment(adapter_id)}.safetensors"


def ensure_bucket(client: S3Client, bucket: str) -> None:
    """Create ``bucket`` unless it already exists; safe to call concurrently and repeatedly."""
    try:
        client.head_bucket(Bucket=bucket)
        return
    except ClientError as exc:
        if _status(exc) != 404:
            raise _wrap(exc, f"head bucket {bucket}") from exc
    except BotoCoreError as exc:
        raise _wrap(exc, f"head bucket {bucket}") from exc
    kwargs: dict[str, Any] = {"Bucket": bucket}
    region = client.meta.region_name
    if region and region != "us-east-1":
        # AWS rejects an explicit us-east-1 constraint and requires one everywhere else.
        kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
    try:
        client.create_bucket(**kwargs)
    except ClientError as exc:
        # Another process created it between our HEAD and CREATE.
        if _code(exc) not in {"BucketAlreadyOwnedByYou", "BucketAlreadyExists"}:
            raise _wrap(exc, f"create bucket {bucket}") from exc
    except BotoCoreError as exc:
        raise _wrap(exc, f"create bucket {bucket}") from exc


def put_object_checked(
    client: S3Client,
    bucket: str,
    key: str,
    data: bytes | bytearray,
    content_type: str,
    metadata: dict[str, str] | None = None,
) -> str:
    """Upload ``data`` with a SHA-256 the server verifies before storing; returns the hex SHA-256."""
    digest = hashlib.sha256(data).digest()
    checksum = base64.b64encode(digest).decode("ascii")
    with _translated(f"put s3://{bucket}/{key}"):
        # SeaweedFS (4.48, measured) recomputes x-amz-checksum-sha256 and answers 400 BadDigest on a
        # mismatch, so a body corrupted on the way is never stored under this key.
        response = client.put_object(
            Bucket=bucket,
            Key=key,
            Body=data,
            ContentType=content_type,
            Metadata=metadata or {},
            ChecksumSHA256=checksum,
        )
    echoed = response.get("ChecksumSHA256")
    if echoed is not None and echoed != checksum:
        raise TransientStorageError(
            f"put s3://{bucket}/{key}: server stored checksum {echoed}, sent {checksum}", code="BadDigest"
        )
    return digest.hex()


def start_multipart(client: S3Client, bucket: str, key: str, content_type: str) -> str:
    """Begin a multipart upload whose parts carry SHA-256 checksums the server verifies; returns its upload id."""
    with _translated(f"start multipart upload s3://{bucket}/{key}"):
        response = client.create_multipart_upload(
            Bucket=bucket, Key=key, ContentType=content_type, ChecksumAlgorithm="SHA256"
        )
    return str(response["UploadId"])


def upload_part_checked(
    client: S3Client, bucket: str, key: str, upload_id: str, number: int, data: bytes | bytearray
) -> dict[str, Any]:
    """Send part ``number`` (from 1) of a multipart upload with its SHA-256 (a corrupted part is refused with
    BadDigest, as for ``put_object_checked``); returns the part's entry for ``complete_multipart``."""
    checksum = base64.b64encode(hashlib.sha256(data).digest()).decode("ascii")
    with _translated(f"upload part {number} of s3://{bucket}/{key}"):
        response = client.upload_part(
            Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=data, ChecksumSHA256=checksum
        )
    echoed = response.get("ChecksumSHA256")
    if echoed is not None and echoed != checksum:
        raise TransientStorageError(
            f"upload part {number} of s3://{bucket}/{key}: server stored checksum {echoed}, sent {checksum}",
            code="BadDigest",
        )
    return {"PartNumber": number, "ETag": response["ETag"], "ChecksumSHA256": checksum}


def complete_multipart(client: S3Client, bucket: str, key: str, upload_id: str, parts: list[dict[str, Any]]) -> None:
    """Assemble the uploaded parts (in order) into the object."""
    with _translated(f"complete multipart upload s3://{bucket}/{key}"):
        client.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts})


def abort_multipart(client: S3Client, bucket: str, key: str, upload_id: str) -> None:
    """Drop a multipart upload and every part sent so far (nothing of it stays in the bucket)."""
    with _translated(f"abort multipart upload s3://{bucket}/{key}"):
        client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)


def presign_get(client: S3Client, bucket: str, key: str, ttl_s: int) -> tuple[str, datetime]:
    """A presigned GET URL for the object and the UTC time it stops working."""
    if not 1 <= ttl_s <= MAX_PRESIGN_TTL_S:
        raise ValueError(f"ttl_s must be in [1, {MAX_PRESIGN_TTL_S}], got {ttl_s}")
    # Taken before signing, so the reported expiry is never later than the signature's.
    expires_at = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=ttl_s)
    with _translated(f"presign s3://{bucket}/{key}"):
        url: str = client.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=ttl_s)
    return url, expires_at


def delete_keys(client: S3Client, bucket: str, keys: Iterable[str]) -> None:
    """Delete these keys; keys that do not exist count as deleted."""
    pending = list(dict.fromkeys(keys))
    for start in range(0, len(pending), _DELETE_BATCH):
        batch = pending[start : start + _DELETE_BATCH]
        with _translated(f"delete {len(batch)} keys from s3://{bucket}"):
            response = client.delete_objects(
                Bucket=bucket, Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True}
            )
        errors = response.get("Errors") or []
        if errors:
            first = errors[0]
            code = first.get("Code")
            raise _storage_error(
                f"delete s3://{bucket}/{first.get('Key')}: {code} {first.get('Message', '')}"
                f" ({len(errors)} of {len(batch)} keys failed)",
                transient=code in _TRANSIENT_CODES,
                code=code,
            )


def get_object_bytes(client: S3Client, bucket: str, key: str, *, max_bytes: int | None = None) -> bytes:
    """The bytes of an object (refused past ``max_bytes`` when given)."""
    with _translated(f"get {key}"):
        body = client.get_object(Bucket=bucket, Key=key)["Body"]
        data = body.read() if max_bytes is None else body.read(max_bytes + 1)
    if max_bytes is not None and len(data) > max_bytes:
        raise StorageError(f"object {key} is over {max_bytes} bytes")
    return bytes(data)


def object_sha256(client: S3Client, bucket: str, key: str) -> str:
    """Download the object and return its hex SHA-256."""
    hasher = hashlib.sha256()
    with _translated(f"get s3://{bucket}/{key}"):
        body = client.get_object(Bucket=bucket, Key=key)["Body"]
        try:
            for chunk in body.iter_chunks(_READ_CHUNK):
                hasher.update(chunk)
        finally:
            body.close()
    return hasher.hexdigest()


def ping(client: S3Client, bucket: str) -> bool:
    """True when the bucket answers a HEAD; bounded by the client's timeouts (build it with small ones)."""
    try:
        client.head_bucket(Bucket=bucket)
    except (BotoCoreError, ClientError):
        return False
    return True


def _segment(value: str) -> str:
    # Ids become path segments: a '/' or '..' in one would escape its tenant's prefix.
    if not _SEGMENT.fullmatch(value) or ".." in value:
        raise ValueError(f"not a safe key segment: {value!r}")
    return value


def _ext(ext: str) -> str:
    if not _EXT.fullmatch(ext):
        raise ValueError(f"extension must be 1-8 lowercase letters or digits without a dot, got {ext!r}")
    return ext


@contextmanager
def _translated(what: str) -> Iterator[None]:
    try:
        yield
    except (ClientError, BotoCoreError) as exc:
        raise _wrap(exc, what) from exc


def _wrap(exc: ClientError | BotoCoreError, what: str) -> StorageError:
    if isinstance(exc, ClientError):
        code, status = _code(exc), _status(exc)
        transient = code in _TRANSIENT_CODES or status in {408, 429} or (status is not None and status >= 500)
        message = exc.response.get("Error", {}).get("Message") or str(exc)
        return _storage_error(f"{what}: {code} ({status}) {message}", transient=transient, code=code, status=status)
    return _storage_error(f"{what}: {exc}", transient=isinstance(exc, _TRANSIENT_TRANSPORT))


def _storage_error(
    message: str, *, transient: bool, code: str | None = None, status: int | None = None
) -> StorageError:
    """The error of a failed S3 call: a TransientStorageError when retrying may help."""
    cls = TransientStorageError if transient else StorageError
    return cls(message, code=code, status=status)


def _code(exc: ClientError) -> str | None:
    code = exc.response.get("Error", {}).get("Code")
    return str(code) if code is not None else None


def _status(exc: ClientError) -> int | None:
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return int(status) if status is not None else None
