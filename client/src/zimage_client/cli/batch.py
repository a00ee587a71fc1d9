"""``zimage batch FILE.jsonl``: submit one job per line as a batch, follow it with a live bar, and download every
image verified by its sha256. Resumable: run the same command again after Ctrl-C or a crash and it re-attaches
to the same batch and downloads only what is missing (see ``resume``)."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from ..calls import new_idempotency_key
from ..client import Client
from ..errors import NotFound
from ..objects import Batch
from ..transfer import extension, is_verified, remove_partials
from . import exit_codes
from .options import connection, err, out
from .progress import BatchProgress
from .resume import BatchRecord, ResumeState


def read_jobs(path: Path) -> tuple[bytes, list[dict[str, Any]]]:
    """The file's bytes and its job requests, one JSON object a line (blank lines skipped)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise typer.BadParameter(f"cannot read {path}: {exc.strerror}") from exc
    jobs = []
    for number, line in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            job = json.loads(line)
        except ValueError as exc:
            raise typer.BadParameter(f"{path}:{number}: not JSON ({exc})") from exc
        if not isinstance(job, dict):
            raise typer.BadParameter(f"{path}:{number}: a job request must be a JSON object")
        jobs.append(job)
    if not jobs:
        raise typer.BadParameter(f"{path} holds no job")
    return data, jobs


def output_name(index: int, output_index: int, ext: str) -> str:
    """The file of a batch image: the input line's job index, then the image's index."""
    return f"{index:05d}-{output_index}.{ext}"


class Downloader:
    """Downloads a batch's succeeded images into a folder as the batch runs, each once, verified."""

    def __init__(self, client: Client, batch_id: str, folder: Path) -> None:
        self._client = client
        self._batch_id = batch_id
        self.folder = folder
        self._done: set[tuple[str, int]] = set()
        self._synced_succeeded = -1
        self._next_sync = 0.0
        self.downloaded = 0
        self.present = 0
        remove_partials(folder)

    def due(self, batch: Batch) -> bool:
        """Whether new images are ready and the last manifest read is not too recent."""
        counts = batch.get("counts")
        return (
            counts is not None and counts["succeeded"] > self._synced_succeeded and time.monotonic() >= self._next_sync
        )

    def sync(self, batch: Batch | None = None) -> int:
        """Read the manifest and fetch every succeeded image not yet here; how many were downloaded."""
        started = time.monotonic()
        if batch is not None and batch.get("counts") is not None:
            self._synced_succeeded = batch["counts"]["succeeded"]
        before = self.downloaded
        for line in self._client.iter_manifest(self._batch_id):
            if line.get("status") != "succeeded":
                continue
            for output in line.get("outputs", []):
                key = (line["job_id"], output["index"])
                if key in self._done:
                    continue
                target = self.folder / output_name(line["index"], output["index"], extension(output))
                if is_verified(target, output.get("sha256")):
                    self.present += 1
                else:
                    self._client.download(output, target)
                    self.downloaded += 1
                self._done.add(key)
        # A big manifest takes a while to read: never spend more than a quarter of the time reading it.
        self._next_sync = time.monotonic() + max(1.0, 3 * (time.monotonic() - started))
        return self.downloaded - before


def _images_per_job(jobs: list[dict[str, Any]], defaults: dict[str, Any]) -> float:
    counts = [int(job.get("num_images", defaults.get("num_images", 1)) or 1) for job in jobs]
    return sum(counts) / len(counts)


def attach_or_submit(
    client: Client,
    state: ResumeState,
    record: BatchRecord | None,
    *,
    digest: str,
    name: str,
    jobs: list[dict[str, Any]],
    defaults: dict[str, Any],
) -> tuple[Batch, bool]:
    """The batch of this input: the recorded one (re-attached), else a new submission; and whether it is new."""
    api_url = client.config.base_url
    if record is not None and record.matches(api_url, defaults) and record.batch_id is not None:
        try:
            return client.get_batch(record.batch_id), False
        except NotFound:
            err.print(f"[yellow]recorded batch {record.batch_id} is not this key's: submitting anew[/]")
            record = None
    if record is None or not record.matches(api_url, defaults):
        record = BatchRecord(digest, name, api_url, new_idempotency_key(), defaults)
        state.put(record)  # the key first: a run stopped during the submit re-sends it and gets the same batch
    batch = client.submit_batch(jobs, defaults=defaults, idempotency_key=record.idempotency_key)
    state.put(BatchRecord(digest, name, api_url, record.idempotency_key, defaults, batch["id"]))
    return batch, record.batch_id is None


def batch(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(help="JSONL: one job request per line (prompt, width, seed, …).")],
    wait: Annotated[
        bool, typer.Option("--wait/--no-wait", help="Follow the batch to its end with a live bar.")
    ] = False,
    download: Annotated[
        Path | None,
        typer.Option("--download", "-d", help="Download every image here (implies --wait); resumable."),
    ] = None,
    defaults: Annotated[
        str | None, typer.Option(help="Fields every job gets unless it sets them, as JSON: '{\"width\": 512}'.")
    ] = None,
    new: Annotated[
        bool, typer.Option("--new", help="Submit a new batch even if this file was submitted before.")
    ] = False,
    timeout: Annotated[float | None, typer.Option(help="Give up waiting after this many seconds (exit 5).")] = None,
) -> None:
    """Submit FILE as one batch; with --wait follow it, with --download DIR fetch every image.

    Run the same command again after Ctrl-C or a crash: it re-attaches to the batch recorded in
    DIR/.zimage-batch.json (keyed by FILE's sha256) and downloads only the files still missing."""
    data, jobs = read_jobs(file)
    try:
        batch_defaults = json.loads(defaults) if defaults else {}
    except ValueError as exc:
        raise typer.BadParameter(f"--defaults is not JSON: {exc}") from exc
    if not isinstance(batch_defaults, dict):
        raise typer.BadParameter("--defaults must be a JSON object")
    digest = hashlib.sha256(data).hexdigest()
    state = ResumeState(download if download is not None else Path("."))
    record = None if new else state.get(digest)
    with connection(ctx).client() as client:
        current, fresh = attach_or_submit(
            client, state, record, digest=digest, name=file.name, jobs=jobs, defaults=batch_defaults
        )
        batch_id = current["id"]
        verb = "submitted" if fresh else "re-attached to"
        err.print(f"{verb} batch {batch_id} ({current['counts']['total']} jobs) from {file.name}")
        if not wait and download is None:
            out.print(batch_id)
            return
        try:
            final = _follow(client, current, download, _images_per_job(jobs, batch_defaults), timeout)
        except KeyboardInterrupt:
            err.print(f"\ninterrupted: run the same command again to resume batch {batch_id}")
            raise typer.Exit(exit_codes.INTERRUPTED) from None
    counts = final["counts"]
    out.print(
        f"batch {batch_id}: {final['status']}, {counts['succeeded']} succeeded, {counts['failed']} failed, "
        f"{counts['canceled']} canceled of {counts['total']}"
    )
    if counts["failed"] or counts["canceled"]:
        raise typer.Exit(exit_codes.FAILED)


def _follow(client: Client, current: Batch, folder: Path | None, images_per_job: float, timeout: float | None) -> Batch:
    downloader = Downloader(client, current["id"], folder) if folder is not None else None
    with BatchProgress(err, current["id"], images_per_job, downloading=downloader is not None) as bar:

        def update(state: Batch) -> None:
            if downloader is not None and downloader.due(state):
                bar.add_downloaded(downloader.sync(state))
            bar.update(state)

        update(current)
        final = client.wait_batch(current["id"], timeout=timeout, on_update=update)
        if downloader is not None:
            bar.add_downloaded(downloader.sync(final))
            bar.update(final)
    if downloader is not None:
        out.print(
            f"downloaded {downloader.downloaded}, already present {downloader.present} "
            f"(all verified by sha256) in {downloader.folder}"
        )
    return final
