"""Adapter files on a worker: fetched from S3 once, verified by SHA-256, kept parsed in host memory (an LRU
bounded in bytes), and re-warmed at start from what the worker's queues used most in the last day."""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Engine, select, text

from core import storage
from core.errors import StorageError, ValidationFailed
from core.lifecycle import ClaimedJob
from core.models import adapters
from core.retry import Backoff, db_call, retrying
from worker.engine.adapters import Adapter, LoraUse

log = logging.getLogger(__name__)

# The adapters a worker's queues used most in the last day (a restart loads them before its first batch).
_MOST_USED = text(
    """
    SELECT l->>'adapter_id' AS id, count(*) AS uses
    FROM jobs j CROSS JOIN LATERAL jsonb_array_elements(j.request->'loras') l
    WHERE j.created_at > now() - interval '1 day' AND j.queue = ANY(:queues) AND j.request->'loras' <> '[]'::jsonb
    GROUP BY 1 ORDER BY uses DESC LIMIT :n
    """
)


class AdapterStore:
    """Adapters by id for the jobs this worker runs; safe to use from the prefetch and main threads."""

    def __init__(self, *, db: Engine, s3: Any, bucket: str, max_bytes: int, db_retry_s: float, storage_retry_s: float):
        self.db, self.s3, self.bucket, self.max_bytes = db, s3, bucket, max_bytes
        self.db_retry_s, self.storage_retry_s = db_retry_s, storage_retry_s
        self._cache: OrderedDict[str, Adapter] = OrderedDict()
        self._lock = threading.Lock()
        self.downloads = 0
        self.hits = 0

    def uses(self, job: ClaimedJob) -> tuple[LoraUse, ...]:
        """The adapters a job names, with their scales (fetched unless cached); ValidationFailed when one is gone
        or is not the job's tenant's (checked at submit; deleted since)."""
        loras = job.request.get("loras") or []
        found = self.get(job.tenant_id, [lo["adapter_id"] for lo in loras])
        return tuple(LoraUse(found[lo["adapter_id"]], float(lo["scale"])) for lo in loras)

    def get(self, tenant_id: str | None, ids: Sequence[str]) -> dict[str, Adapter]:
        """Adapters by id (``tenant_id`` None: any tenant's, for re-warming)."""
        with self._lock:
            cached = {i: self._cache[i] for i in ids if i in self._cache}
            for i in cached:
                self._cache.move_to_end(i)
            self.hits += len(cached)
        missing = [i for i in ids if i not in cached]
        if not missing:
            return cached
        query = select(adapters.c.id, adapters.c.tenant_id, adapters.c.key, adapters.c.sha256, adapters.c.bytes)
        rows = db_call(
            self.db,
            lambda conn: conn.execute(query.where(adapters.c.id.in_(missing))).all(),
            deadline_s=self.db_retry_s,
            what="find adapters",
        )
        by_id = {row.id: row for row in rows if tenant_id is None or row.tenant_id == tenant_id}
        for index, adapter_id in enumerate(ids):
            if adapter_id not in cached and adapter_id not in by_id:
                detail = {"field": f"loras.{index}.adapter_id", "message": "no such adapter"}
                message = f"adapter {adapter_id} does not exist (deleted after the job was queued?)"
                raise ValidationFailed(message, [detail])
        for adapter_id in missing:
            cached[adapter_id] = self._fetch(by_id[adapter_id])
        return cached

    def _fetch(self, row: Any) -> Adapter:
        """Download, verify and parse one adapter file, and keep it (evicting the least recently used)."""
        data = retrying(
            lambda: storage.get_object_bytes(self.s3, self.bucket, row.key, max_bytes=row.bytes),
            backoff=Backoff(deadline_s=self.storage_retry_s),
            what=f"get adapter {row.id}",
        )
        digest = hashlib.sha256(data).hexdigest()
        if digest != row.sha256:
            raise StorageError(f"adapter {row.id}: the stored file's SHA-256 is {digest}, not {row.sha256}")
        adapter = Adapter.from_bytes(row.id, data)
        del data
        with self._lock:
            self.downloads += 1
            self._cache[row.id] = adapter
            self._cache.move_to_end(row.id)
            while len(self._cache) > 1 and sum(a.nbytes for a in self._cache.values()) > self.max_bytes:
                self._cache.popitem(last=False)
        return adapter

    def most_used(self, queues: Sequence[str], count: int) -> list[Adapter]:
        """The ``count`` adapters the queues used most in the last day that still exist, fetched (for start-up)."""
        if count <= 0:
            return []
        ids = db_call(
            self.db,
            lambda conn: [r.id for r in conn.execute(_MOST_USED, {"queues": list(queues), "n": count})],
            deadline_s=self.db_retry_s,
            what="most used adapters",
        )
        warmed = []
        for adapter_id in ids:
            try:
                warmed.append(self.get(None, [adapter_id])[adapter_id])
            except (ValidationFailed, StorageError) as exc:  # deleted or unreadable: the jobs will say so
                log.warning("not re-warming adapter %s: %s", adapter_id, exc)
        return warmed
