"""From a validated request to the inserted row: group key, cost, request hash, seed and queue."""

from __future__ import annotations

from typing import Any

import pytest

from core.queue import queue_for
from core.schemas import MAX_SEED, JobRequest, LoraRef
from core.submission import build_job_row, cost_tokens, group_key, request_hash

UPLOAD = {"upload_id": "upl_0123456789abcdef"}
MASK = {"upload_id": "upl_abcdefghij012345"}


def req(**fields: Any) -> JobRequest:
    fields.setdefault("prompt", "a lighthouse at dusk")
    return JobRequest.model_validate(fields)


# --- group_key --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "other",
    [
        {"prompt": "a completely different picture"},
        {"negative_prompt": "blurry"},
        {"seed": 42},
        {"num_images": 4},
        {"priority": 9},
        {"output_format": "webp", "output_quality": 70},
        {"metadata": {"order": 1}},
        {"steps": 8, "guidance_scale": 0.0},  # the defaults, given explicitly
    ],
    ids=["prompt", "negative", "seed", "num_images", "priority", "format", "metadata", "explicit-defaults"],
)
def test_compatible_jobs_share_a_group_key(other: dict[str, Any]) -> None:
    assert group_key(req()) == group_key(req(**other))


def test_a_webhook_does_not_split_the_group() -> None:
    # Where a job's result is announced has nothing to do with how it runs.
    hooked = req().model_copy(update={"webhook_url": "https://hooks.example.com/h"})
    assert group_key(req()) == group_key(hooked)


@pytest.mark.parametrize(
    "other",
    [{"width": 512}, {"height": 768}, {"steps": 9}, {"guidance_scale": 3.5}],
    ids=["width", "height", "steps", "guidance"],
)
def test_size_steps_or_guidance_split_the_group(other: dict[str, Any]) -> None:
    assert group_key(req()) != group_key(req(**other))


def test_width_and_height_are_not_interchangeable() -> None:
    assert group_key(req(width=512, height=1024)) != group_key(req(width=1024, height=512))


def test_kind_and_mode_split_the_group() -> None:
    keys = {
        group_key(req()),
        group_key(req(kind="edit", input_images=[UPLOAD])),
        group_key(req(kind="edit", mode="img2img", input_images=[UPLOAD])),
        group_key(req(kind="edit", mode="inpaint", input_images=[UPLOAD], mask=MASK)),
    }
    assert len(keys) == 4


def test_strength_splits_img2img_groups() -> None:
    a = req(kind="edit", mode="img2img", input_images=[UPLOAD], strength=0.3)
    b = req(kind="edit", mode="img2img", input_images=[UPLOAD], strength=0.8)
    assert group_key(a) != group_key(b)


def test_different_input_images_still_share_a_group() -> None:
    a = req(kind="edit", mode="img2img", input_images=[UPLOAD])
    b = req(kind="edit", mode="img2img", input_images=[MASK])
    assert group_key(a) == group_key(b)


def with_loras(*loras: dict[str, Any]) -> JobRequest:
    """A request carrying adapters (group keys need no database: the ids need not exist)."""
    return req().model_copy(update={"loras": [LoraRef.model_validate(lo) for lo in loras]})


def test_adapters_split_the_group_but_their_order_does_not() -> None:
    la, lb = {"adapter_id": "lora_aaaaaaaaaaaa"}, {"adapter_id": "lora_bbbbbbbbbbbb", "scale": 0.5}
    assert group_key(with_loras(la, lb)) == group_key(with_loras(lb, la))
    assert group_key(with_loras(la)) != group_key(req())
    assert group_key(with_loras(la)) != group_key(with_loras(lb))
    assert group_key(with_loras({**la, "scale": 0.5})) != group_key(with_loras(la))


# --- cost_tokens ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("width", "height", "n", "tokens"),
    [
        (1024, 1024, 1, 4096),
        (1024, 1024, 2, 8192),
        (512, 768, 3, 32 * 48 * 3),
        (256, 256, 1, 256),
        (2048, 2048, 8, 128 * 128 * 8),
    ],
)
def test_cost_is_image_tokens_times_images(width: int, height: int, n: int, tokens: int) -> None:
    assert cost_tokens(req(width=width, height=height, num_images=n)) == tokens


# --- request_hash -----------------------------------------------------------------------------------------


def test_request_hash_ignores_key_order() -> None:
    a = {"prompt": "x", "width": 512, "metadata": {"a": 1, "b": [1, 2]}}
    b = {"metadata": {"b": [1, 2], "a": 1}, "width": 512, "prompt": "x"}
    assert request_hash(a) == request_hash(b)


def test_request_hash_of_requests_written_in_another_order() -> None:
    a = JobRequest.model_validate({"prompt": "x", "width": 512, "seed": 3, "metadata": {"a": 1, "b": 2}})
    b = JobRequest.model_validate({"metadata": {"b": 2, "a": 1}, "seed": 3, "width": 512, "prompt": " x "})
    assert request_hash(a.normalized()) == request_hash(b.normalized())


@pytest.mark.parametrize("change", [{"prompt": "y"}, {"width": 528}, {"seed": 4}, {"metadata": {"a": 2}}])
def test_request_hash_changes_with_the_content(change: dict[str, Any]) -> None:
    base = {"prompt": "x", "width": 512, "seed": 3, "metadata": {"a": 1}}
    assert request_hash(base) != request_hash({**base, **change})


def test_request_hash_is_hex_sha256() -> None:
    digest = request_hash(req().normalized())
    assert len(digest) == 64 and int(digest, 16) >= 0


# --- build_job_row ----------------------------------------------------------------------------------------


def test_build_job_row_picks_a_seed_when_missing() -> None:
    seeds = {build_job_row(req(num_images=8), tenant_id="ten_x", max_attempts=3)["request"]["seed"] for _ in range(50)}
    assert all(isinstance(s, int) for s in seeds)
    assert len(seeds) > 45  # chosen at random
    # every image's seed (seed + i) stays within the allowed range
    assert all(s >= 0 and s + 7 <= MAX_SEED for s in seeds)


def test_build_job_row_keeps_a_given_seed() -> None:
    for seed in (0, 12345, MAX_SEED):
        row = build_job_row(req(seed=seed), tenant_id="ten_x", max_attempts=3)
        assert row["request"]["seed"] == seed


def test_build_job_row_does_not_change_the_request() -> None:
    r = req()
    build_job_row(r, tenant_id="ten_x", max_attempts=3)
    assert r.seed is None


def test_build_job_row_fills_the_row() -> None:
    r = req(width=512, height=768, num_images=2, priority=7, metadata={"order": 3})
    row = build_job_row(r, tenant_id="ten_abc", max_attempts=4)
    assert row["id"].startswith("job_")
    assert row["tenant_id"] == "ten_abc"
    assert row["kind"] == "generate"
    assert row["queue"] == "generate"
    assert row["group_key"] == group_key(r)
    assert row["cost_tokens"] == 32 * 48 * 2
    assert row["priority"] == 7
    assert row["metadata"] == {"order": 3}
    assert row["max_attempts"] == 4
    assert row["batch_id"] is None and row["batch_index"] is None
    assert row["idempotency_key"] is None and row["request_hash"] is None
    assert {k: v for k, v in row["request"].items() if k != "seed"} == {
        k: v for k, v in r.normalized().items() if k != "seed"
    }


def test_build_job_row_ids_are_new_each_time() -> None:
    rows = [build_job_row(req(), tenant_id="ten_x", max_attempts=3) for _ in range(100)]
    assert len({row["id"] for row in rows}) == 100


def test_build_job_row_hashes_the_request_as_the_client_sent_it() -> None:
    # Two submits of the same body pick different seeds, yet must be recognised as the same request.
    a = build_job_row(req(), tenant_id="ten_x", max_attempts=3, idempotency_key="k1")
    b = build_job_row(req(), tenant_id="ten_x", max_attempts=3, idempotency_key="k1")
    assert a["idempotency_key"] == "k1"
    assert a["request"]["seed"] != b["request"]["seed"]
    assert a["request_hash"] == b["request_hash"] == request_hash(req().normalized())
    c = build_job_row(req(prompt="something else"), tenant_id="ten_x", max_attempts=3, idempotency_key="k1")
    assert c["request_hash"] != a["request_hash"]


def test_build_job_row_for_a_batch_line() -> None:
    row = build_job_row(req(), tenant_id="ten_x", max_attempts=3, batch_id="bat_1", batch_index=12)
    assert (row["batch_id"], row["batch_index"]) == ("bat_1", 12)


def test_build_job_row_routes_edits_to_their_queue() -> None:
    instruct = build_job_row(req(kind="edit", input_images=[UPLOAD]), tenant_id="ten_x", max_attempts=3)
    img2img = build_job_row(req(kind="edit", mode="img2img", input_images=[UPLOAD]), tenant_id="ten_x", max_attempts=3)
    assert (instruct["kind"], instruct["queue"]) == ("edit", "edit")
    assert (img2img["kind"], img2img["queue"]) == ("edit", "generate")


# --- queue_for --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "mode", "queue"),
    [
        ("generate", None, "generate"),
        ("edit", "instruct", "edit"),  # the Edit checkpoint
        ("edit", "img2img", "generate"),  # Turbo
        ("edit", "inpaint", "generate"),  # Turbo
    ],
)
def test_queue_for(kind: str, mode: str | None, queue: str) -> None:
    assert queue_for(kind, mode) == queue
