"""An adapter file on its way to S3: checked as it arrives (its header before anything is stored), hashed, and sent
in parts, so the process holds about one part of it whatever the file's size.

``write`` takes the next bytes (quick, no I/O: the multipart parser and the URL reader call it); once the header
is checked and a part's worth is waiting, ``flush`` (blocking) sends it as the next part of a multipart upload.
``finish`` checks the file's length against its header and stores the rest (a file smaller than one part with a
single put); ``abort`` leaves nothing behind. A file is usable only once its row exists, which the caller inserts
after ``finish``.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import anyio
from starlette.concurrency import run_in_threadpool

from core import errors, storage
from core.lora_file import LoraChecker, LoraFile

log = logging.getLogger(__name__)

PART_BYTES = 8 << 20  # S3 takes parts of 5 MiB and more (but the last); 2 GiB is 256 of these
CONTENT_TYPE = "application/octet-stream"


class AdapterWriter:
    """One adapter file streamed to ``key``; every method but ``write``, ``ready`` and ``drain`` blocks."""

    def __init__(
        self, s3: Any, bucket: str, key: str, checker: LoraChecker, *, max_bytes: int, field: str = "file"
    ) -> None:
        self.s3, self.bucket, self.key = s3, bucket, key
        self.checker = checker
        self.max_bytes = max_bytes
        self.field = field
        self.size = 0
        self.parts: list[dict[str, Any]] = []  # the parts sent, for completing the upload
        self.stored = False  # the whole file is in S3 under ``key``
        self._waiting = bytearray()  # what arrived since the last part was sent (sent as is: no copy)
        self._hash = hashlib.sha256()
        self._upload_id: str | None = None

    def write(self, data: bytes) -> None:
        """The next bytes of the file; raises the refusal (413, 415, 422) as soon as the bytes so far show one."""
        self.size += len(data)
        if self.size > self.max_bytes:
            raise self._too_large(f"the file is over the adapter limit of {self.max_bytes} bytes")
        header_checked = self.checker.header_checked
        self.checker.feed(data)
        expected = self.checker.expected_size
        if not header_checked and expected is not None and expected > self.max_bytes:
            raise self._too_large(f"the file's header says {expected} bytes; the limit is {self.max_bytes}")
        self._waiting += data

    def ready(self) -> bool:
        """A part's worth is waiting and the header is checked: ``flush`` would send it."""
        return len(self._waiting) >= PART_BYTES and self.checker.header_checked

    async def drain(self) -> None:
        """Send a waiting part from a thread (the multipart reader calls this between network reads)."""
        if self.ready():
            await run_in_threadpool(self.flush)

    def flush(self) -> None:
        """Send what is waiting as the next part, once there is a part's worth and the header is checked."""
        if not self.ready():
            return
        part = self._take()
        with self._storage():
            if self._upload_id is None:
                self._upload_id = storage.start_multipart(self.s3, self.bucket, self.key, CONTENT_TYPE)
            number = len(self.parts) + 1
            self.parts.append(
                storage.upload_part_checked(self.s3, self.bucket, self.key, self._upload_id, number, part)
            )

    def finish(self) -> tuple[LoraFile, str]:
        """Check the whole file against its header, store the rest; the file's summary and hex SHA-256."""
        summary = self.checker.finish()
        rest = self._take()
        with self._storage():
            if self._upload_id is None:  # smaller than one part: one put, its SHA-256 checked by the server
                storage.put_object_checked(self.s3, self.bucket, self.key, rest, CONTENT_TYPE)
            else:
                if rest:
                    number = len(self.parts) + 1
                    self.parts.append(
                        storage.upload_part_checked(self.s3, self.bucket, self.key, self._upload_id, number, rest)
                    )
                storage.complete_multipart(self.s3, self.bucket, self.key, self._upload_id, self.parts)
        self.stored = True
        return summary, self._hash.hexdigest()

    def abort(self) -> None:
        """Leave nothing of the file in S3 (an upload in progress dropped, a stored object deleted); never raises:
        a failure is logged (an unfinished multipart upload is invisible, and a bucket lifecycle rule drops it)."""
        try:
            if self.stored:
                storage.delete_keys(self.s3, self.bucket, [self.key])
            elif self._upload_id is not None:
                storage.abort_multipart(self.s3, self.bucket, self.key, self._upload_id)
        except errors.StorageError as exc:
            log.warning("could not clean up the refused adapter upload s3://%s/%s: %s", self.bucket, self.key, exc)
        self._waiting = bytearray()

    async def abort_shielded(self) -> None:
        """``abort`` from a thread, even when the request is being cancelled (a client gone mid-upload)."""
        with anyio.CancelScope(shield=True):
            await run_in_threadpool(self.abort)

    def _take(self) -> bytearray:
        """What is waiting, hashed, handed over whole (the writer starts a new buffer)."""
        part, self._waiting = self._waiting, bytearray()
        self._hash.update(part)
        return part

    def _too_large(self, message: str) -> errors.PayloadTooLarge:
        return errors.PayloadTooLarge(
            message, [{"field": self.field, "message": f"must be at most {self.max_bytes} bytes"}]
        )

    @contextmanager
    def _storage(self) -> Iterator[None]:
        try:
            yield
        except errors.StorageError as exc:
            reason = exc.s3_code or "error"
            raise errors.Unavailable(f"storage is unavailable; the adapter was not saved ({reason})") from exc
