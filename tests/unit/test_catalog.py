"""The model table: each model's kinds, defaults and limits, its queue, and what a request naming it becomes."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from core import catalog
from core.queue import QUEUES, queue_for
from core.reuse import model_identity
from core.schemas import JobRequest, error_details
from core.settings import Settings
from core.submission import build_job_row, cost_tokens, group_key

UPLOAD = {"upload_id": "upl_0123456789abcdef"}


def req(**fields: Any) -> JobRequest:
    fields.setdefault("prompt", "a lighthouse at dusk")
    return JobRequest.model_validate(fields)


def refused(**fields: Any) -> list[dict[str, Any]]:
    with pytest.raises(ValidationError) as info:
        req(**fields)
    return error_details(info.value)


def test_every_model_has_its_own_queue_and_setting() -> None:
    assert sorted(spec.queue for spec in catalog.MODELS.values()) == sorted(QUEUES)
    for spec in catalog.MODELS.values():
        assert spec.setting in Settings.model_fields
        assert spec.min_steps <= spec.steps <= spec.max_steps
        assert spec.min_guidance <= spec.guidance_scale <= spec.max_guidance


def test_a_request_without_model_is_turbo_as_before() -> None:
    r = req()
    assert (r.model, r.steps, r.guidance_scale) == ("z-image-turbo", 8, 0.0)
    assert queue_for(r.kind, r.mode, r.model) == "generate"
    assert cost_tokens(r) == 4096
    assert group_key(r) == "generate|-|1024x1024|8|0|"  # the key of every earlier Turbo job
    assert "model" not in r.normalized()  # stored, hashed and echoed as before
    assert req(model="z-image-turbo").normalized() == r.normalized()


def test_an_instruct_edit_runs_the_edit_model() -> None:
    r = req(kind="edit", input_images=[UPLOAD])
    assert r.model == "z-image-edit"
    assert queue_for(r.kind, r.mode, r.model) == "edit"


def test_base_takes_its_own_defaults_and_queue() -> None:
    r = req(model="z-image-base", negative_prompt="blurry")
    assert (r.steps, r.guidance_scale) == (28, 4.0)
    assert r.normalized()["model"] == "z-image-base"
    row = build_job_row(r, tenant_id="ten_x", max_attempts=3)
    assert row["queue"] == "base"
    assert row["group_key"] != group_key(req(steps=28, guidance_scale=4.0))  # never batched with Turbo


def test_guidance_doubles_the_cost() -> None:
    # CFG runs every image twice per step (one doubled batch): the claim's token budget counts that.
    assert cost_tokens(req(model="z-image-base")) == 2 * cost_tokens(req())
    assert cost_tokens(req(guidance_scale=3.0)) == 2 * cost_tokens(req())
    assert cost_tokens(req(model="z-image-base", guidance_scale=0.0)) == cost_tokens(req())


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"model": "z-image-edit"}, "model"),
        ({"model": "z-image-base", "kind": "edit", "mode": "img2img", "input_images": [UPLOAD]}, "model"),
        ({"model": "z-image-turbo", "kind": "edit", "input_images": [UPLOAD]}, "model"),
        ({"model": "z-image-xl"}, "model"),
        ({"model": "z-image-base", "steps": 101}, "steps"),
        ({"model": "z-image-base", "guidance_scale": 21}, "guidance_scale"),
    ],
    ids=["edit-for-generate", "base-for-img2img", "turbo-for-instruct", "unknown", "steps", "guidance"],
)
def test_a_model_outside_its_table_row_is_refused_on_the_field(fields: dict[str, Any], field: str) -> None:
    assert {d["field"] for d in refused(**fields)} == {field}


def test_served_models_are_those_a_setting_names() -> None:
    plain = Settings(turbo_model="t", edit_model=None, base_model=None)
    assert [s.name for s in catalog.served(plain)] == ["z-image-turbo"]
    assert catalog.unserved(plain, "z-image-base") == "z-image-base is not served here: ZIMAGE_BASE_MODEL is unset"
    both = Settings(turbo_model="t", base_model="b", edit_model="e")
    assert [s.name for s in catalog.served(both)] == ["z-image-turbo", "z-image-base", "z-image-edit"]
    assert catalog.unserved(both, "z-image-base") is None


def test_the_reuse_key_names_the_model() -> None:
    s = Settings(turbo_model="t", base_model="t", model_revision="r1")
    assert model_identity(s, "generate", None) == "t@r1"  # Turbo's identity is what it always was
    assert model_identity(s, "generate", None, "z-image-turbo") == "t@r1"
    # Base on the very same weights still never shares a key with Turbo.
    assert model_identity(s, "generate", None, "z-image-base") == "z-image-base=t@r1"
