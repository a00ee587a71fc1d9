"""The job request of API.md, field by field: each bound just inside passes, just outside fails naming the field."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import ValidationError

from core.schemas import MAX_METADATA_DEPTH, MAX_SEED, JobRequest, error_details

UPLOAD = {"upload_id": "upl_0123456789abcdef"}
UPLOAD_2 = {"upload_id": "upl_abcdefghij0123"}
URL_REF = {"url": "https://images.example.com/cat.png"}
LORA = "lora_0123456789abcdef"


def parse(**fields: Any) -> JobRequest:
    """A request with a valid prompt unless the test gives one."""
    fields.setdefault("prompt", "a lighthouse at dusk")
    return JobRequest.model_validate(fields)


def refused(**fields: Any) -> list[dict[str, Any]]:
    """The error details of a request that must be refused."""
    fields.setdefault("prompt", "a lighthouse at dusk")
    with pytest.raises(ValidationError) as info:
        JobRequest.model_validate(fields)
    return error_details(info.value)


def fields_of(details: list[dict[str, Any]]) -> set[str]:
    return {d["field"] for d in details}


def edit(**fields: Any) -> dict[str, Any]:
    """An edit request's fields (instruct, one upload) merged with ``fields``."""
    return {"kind": "edit", "input_images": [UPLOAD], **fields}


# --- defaults ---------------------------------------------------------------------------------------------


def test_a_prompt_alone_gets_every_default_of_the_table() -> None:
    req = parse()
    assert req.kind == "generate"
    assert req.mode is None
    assert req.negative_prompt is None
    assert (req.width, req.height) == (1024, 1024)
    assert req.steps == 8  # Turbo's default
    assert req.guidance_scale == 0.0  # Turbo: no CFG
    assert req.seed is None
    assert req.num_images == 1
    assert req.output_format == "png"
    assert req.output_quality == 90
    assert req.input_images == []
    assert req.mask is None
    assert req.strength == 0.6
    assert req.priority == 5
    assert req.webhook_url is None
    assert req.metadata == {}
    assert req.loras == []


def test_an_edit_defaults_to_instruct_mode_and_turbo_steps() -> None:
    req = JobRequest.model_validate({"prompt": "make it blue", **edit()})
    assert req.mode == "instruct"
    assert req.steps == 8
    assert req.guidance_scale == 0.0


def test_given_steps_and_guidance_are_kept() -> None:
    req = parse(steps=30, guidance_scale=4.5)
    assert (req.steps, req.guidance_scale) == (30, 4.5)


def test_prompt_is_required() -> None:
    with pytest.raises(ValidationError) as info:
        JobRequest.model_validate({"width": 512})
    assert error_details(info.value) == [{"field": "prompt", "message": "Field required"}]


# --- prompt -----------------------------------------------------------------------------------------------


def test_prompt_is_trimmed() -> None:
    assert parse(prompt="  a red fox \n\t").prompt == "a red fox"


@pytest.mark.parametrize("prompt", ["x", "x" * 4000, "  " + "x" * 4000 + "  "], ids=["1", "4000", "4000+spaces"])
def test_prompt_of_1_to_4000_characters_after_trimming_passes(prompt: str) -> None:
    assert 1 <= len(parse(prompt=prompt).prompt) <= 4000


@pytest.mark.parametrize("prompt", ["", "   ", "\n\t ", "x" * 4001], ids=["empty", "spaces", "whitespace", "4001"])
def test_prompt_empty_after_trimming_or_over_4000_is_refused(prompt: str) -> None:
    assert fields_of(refused(prompt=prompt)) == {"prompt"}


def test_negative_prompt_bounds() -> None:
    assert parse(negative_prompt="n" * 4000).negative_prompt == "n" * 4000
    assert fields_of(refused(negative_prompt="n" * 4001)) == {"negative_prompt"}


# --- numeric bounds: just inside passes, just outside fails naming the field -------------------------------

INSIDE = [
    ("width", 256),
    ("width", 2048),
    ("width", 272),
    ("height", 256),
    ("height", 2048),
    ("steps", 1),
    ("steps", 100),
    ("guidance_scale", 0),
    ("guidance_scale", 20),
    ("guidance_scale", 19.99),
    ("seed", 0),
    ("seed", MAX_SEED),
    ("num_images", 1),
    ("num_images", 8),
    ("output_quality", 1),
    ("output_quality", 100),
    ("strength", 0),
    ("strength", 1),
    ("priority", 0),
    ("priority", 9),
]

OUTSIDE = [
    ("width", 240),
    ("width", 2064),
    ("width", 1000),  # not a multiple of 16
    ("width", 0),
    ("height", 240),
    ("height", 2064),
    ("height", 520),
    ("steps", 0),
    ("steps", 101),
    ("guidance_scale", -0.01),
    ("guidance_scale", 20.01),
    ("seed", -1),
    ("seed", MAX_SEED + 1),
    ("num_images", 0),
    ("num_images", 9),
    ("output_quality", 0),
    ("output_quality", 101),
    ("strength", -0.01),
    ("strength", 1.01),
    ("priority", -1),
    ("priority", 10),
]


@pytest.mark.parametrize(("field", "value"), INSIDE, ids=[f"{f}={v}" for f, v in INSIDE])
def test_value_just_inside_its_bound_passes(field: str, value: Any) -> None:
    assert getattr(parse(**{field: value}), field) == value


@pytest.mark.parametrize(("field", "value"), OUTSIDE, ids=[f"{f}={v}" for f, v in OUTSIDE])
def test_value_just_outside_its_bound_is_refused_naming_the_field(field: str, value: Any) -> None:
    assert fields_of(refused(**{field: value})) == {field}


def test_largest_image_is_2048_by_2048() -> None:
    req = parse(width=2048, height=2048)
    assert req.width * req.height == 2048 * 2048


# --- strict types -----------------------------------------------------------------------------------------

WRONG_TYPES = [
    ("width", "512"),
    ("height", 512.0),
    ("steps", "8"),
    ("seed", True),
    ("seed", "42"),
    ("seed", 1.5),
    ("num_images", True),
    ("priority", "9"),
    ("output_quality", 90.0),
    ("guidance_scale", "3.5"),
    ("guidance_scale", True),
    ("strength", False),
    ("prompt", 123),
    ("prompt", ["a", "b"]),
    ("negative_prompt", 5),
    ("metadata", ["not", "an", "object"]),
    ("metadata", "{}"),
    ("kind", "Generate"),
    ("output_format", "jpg"),
    ("input_images", "upl_0123456789abcdef"),
    ("loras", {"adapter_id": LORA}),
]


@pytest.mark.parametrize(("field", "value"), WRONG_TYPES, ids=[f"{f}={v!r}" for f, v in WRONG_TYPES])
def test_values_of_the_wrong_type_are_not_coerced(field: str, value: Any) -> None:
    details = refused(**{field: value})
    assert details, "a wrongly typed value must be refused"
    assert all(d["field"] == field or d["field"].startswith(field + ".") for d in details), details


def test_integral_guidance_and_strength_are_numbers() -> None:
    req = parse(guidance_scale=5, steps=20)
    assert req.guidance_scale == 5.0


@pytest.mark.parametrize("field", ["prompts", "size", "Width", "accelerate", "user"])
def test_unknown_fields_are_refused_by_name(field: str) -> None:
    details = refused(**{field: 1})
    assert details == [{"field": field, "message": "unknown field"}]


def test_several_problems_are_all_reported() -> None:
    details = refused(prompt=" ", width=1000, steps=0, seed=-1, colour="red")
    assert fields_of(details) == {"prompt", "width", "steps", "seed", "colour"}
    assert all(isinstance(d["message"], str) and d["message"] for d in details)


# --- metadata, webhook, loras -----------------------------------------------------------------------------


def _metadata_of_json_size(size: int) -> dict[str, str]:
    """A metadata object whose compact JSON is exactly ``size`` bytes."""
    overhead = len(json.dumps({"k": ""}, separators=(",", ":")))
    meta = {"k": "v" * (size - overhead)}
    assert len(json.dumps(meta, separators=(",", ":")).encode()) == size
    return meta


def test_metadata_of_4_kib_as_json_passes_and_is_kept() -> None:
    meta = _metadata_of_json_size(4096)
    assert parse(metadata=meta).metadata == meta


def test_metadata_over_4_kib_as_json_is_refused() -> None:
    assert fields_of(refused(metadata=_metadata_of_json_size(4097))) == {"metadata"}


def test_metadata_size_counts_bytes_not_characters() -> None:
    # 1500 three-byte characters: 1500 characters, but 4500+ bytes of JSON.
    assert fields_of(refused(metadata={"k": "€" * 1500})) == {"metadata"}


def _metadata_of_depth(depth: int) -> dict[str, Any]:
    """A metadata object nesting ``depth`` levels (the object itself is level 1)."""
    return {"a": json.loads("[" * (depth - 1) + "]" * (depth - 1))}


def test_metadata_nesting_bound() -> None:
    assert parse(metadata=_metadata_of_depth(MAX_METADATA_DEPTH)).metadata == _metadata_of_depth(MAX_METADATA_DEPTH)
    assert fields_of(refused(metadata=_metadata_of_depth(MAX_METADATA_DEPTH + 1))) == {"metadata"}


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"prompt": "a\x00b"}, "prompt"),
        ({"negative_prompt": "blurry\x00"}, "negative_prompt"),
        ({"metadata": {"k": "v\x00"}}, "metadata"),
        ({"metadata": {"k\x00": 1}}, "metadata"),
        ({"metadata": {"k": ["ok", {"deep": "\x00"}]}}, "metadata"),
    ],
    ids=["prompt", "negative_prompt", "metadata-value", "metadata-key", "metadata-nested"],
)
def test_nul_characters_are_refused(fields: dict[str, Any], field: str) -> None:
    # Postgres can store NUL in neither text nor JSONB: refuse it here, not with a 500 at insert time.
    assert fields_of(refused(**fields)) == {field}


def test_nested_metadata_is_echoed() -> None:
    meta = {"order": 17, "tags": ["a", "b"], "nested": {"x": None, "y": 1.5}}
    assert parse(metadata=meta).normalized()["metadata"] == meta


def test_a_webhook_url_is_kept_in_the_request() -> None:
    # Where it may point (https, a public address) is the submit's check: core.webhook_urls.
    assert parse(webhook_url="https://hooks.example.com/zimage?x=1").normalized()["webhook_url"] == (
        "https://hooks.example.com/zimage?x=1"
    )


def test_a_null_webhook_is_the_default() -> None:
    assert parse(webhook_url=None).webhook_url is None


@pytest.mark.parametrize("url", ["ftp://hooks.example.com/x", "not a url", "hooks.example.com/x", "https://"])
def test_webhook_must_be_a_web_url(url: str) -> None:
    assert fields_of(refused(webhook_url=url)) == {"webhook_url"}


LORA_2 = "lora_abcdefghij0123"
LORA_3 = "lora_0000000000zzzz"


@pytest.mark.parametrize(
    "loras",
    [
        [{"adapter_id": LORA}],
        [{"adapter_id": LORA, "scale": 0}, {"adapter_id": LORA_2, "scale": 2}, {"adapter_id": LORA_3}],
    ],
    ids=["one", "three"],
)
def test_up_to_three_adapters_are_accepted_with_scale_1_by_default(loras: list[dict[str, Any]]) -> None:
    req = parse(loras=loras)
    assert [(lo.adapter_id, lo.scale) for lo in req.loras] == [(lo["adapter_id"], lo.get("scale", 1.0)) for lo in loras]


def test_adapters_apply_to_generate_img2img_and_inpaint_but_not_instruct() -> None:
    loras = [{"adapter_id": LORA, "scale": 0.5}]
    assert parse(**edit(mode="img2img"), loras=loras).loras[0].scale == 0.5
    assert parse(**edit(mode="inpaint", mask=UPLOAD_2), loras=loras).loras[0].adapter_id == LORA
    details = refused(**edit(), loras=loras)
    assert fields_of(details) == {"loras"} and "instruct" in details[0]["message"]


def test_the_same_adapter_twice_is_refused() -> None:
    details = refused(loras=[{"adapter_id": LORA}, {"adapter_id": LORA, "scale": 0.5}])
    assert details == [{"field": "loras", "message": f"adapter {LORA} is named twice; give each adapter once"}]


def test_normalized_adapters_are_sorted_so_equal_sets_are_equal_requests() -> None:
    forward = parse(loras=[{"adapter_id": LORA_2, "scale": 0.5}, {"adapter_id": LORA}]).normalized()
    backward = parse(loras=[{"adapter_id": LORA}, {"adapter_id": LORA_2, "scale": 0.5}]).normalized()
    assert forward == backward
    assert forward["loras"] == [{"adapter_id": LORA, "scale": 1.0}, {"adapter_id": LORA_2, "scale": 0.5}]


def test_an_empty_lora_list_is_the_default() -> None:
    assert parse(loras=[]).loras == []


def test_four_loras_are_refused() -> None:
    assert fields_of(refused(loras=[{"adapter_id": LORA}] * 4)) == {"loras"}


@pytest.mark.parametrize("scale", [-0.01, 2.01])
def test_lora_scale_outside_0_to_2_is_refused(scale: float) -> None:
    assert fields_of(refused(loras=[{"adapter_id": LORA, "scale": scale}])) == {"loras.0.scale"}


@pytest.mark.parametrize("adapter_id", ["upl_0123456789abcdef", "lora_", "lora_ABCDEFGHIJKL", 7])
def test_lora_needs_a_lora_id(adapter_id: Any) -> None:
    assert fields_of(refused(loras=[{"adapter_id": adapter_id}])) == {"loras.0.adapter_id"}


def test_lora_with_an_unknown_key_is_refused() -> None:
    assert fields_of(refused(loras=[{"adapter_id": LORA, "weight": 1}])) == {"loras.0.weight"}


# --- kind and mode ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"input_images": [UPLOAD]}, "input_images"),
        ({"mask": UPLOAD}, "mask"),
        ({"mode": "instruct"}, "mode"),
        ({"mode": "img2img"}, "mode"),
    ],
    ids=["input_images", "mask", "mode-instruct", "mode-img2img"],
)
def test_generate_takes_no_images_mask_or_mode(extra: dict[str, Any], field: str) -> None:
    assert field in fields_of(refused(kind="generate", **extra))


def test_edit_without_images_is_refused() -> None:
    assert fields_of(refused(kind="edit")) == {"input_images"}
    assert fields_of(refused(kind="edit", input_images=[])) == {"input_images"}


def test_edit_takes_one_to_three_images() -> None:
    assert len(parse(**edit(input_images=[UPLOAD, UPLOAD_2, URL_REF])).input_images) == 3
    assert fields_of(refused(**edit(input_images=[UPLOAD, UPLOAD_2, URL_REF, UPLOAD]))) == {"input_images"}


@pytest.mark.parametrize("mode", ["img2img", "inpaint"])
def test_img2img_and_inpaint_take_exactly_one_image(mode: str) -> None:
    extra = {"mask": UPLOAD_2} if mode == "inpaint" else {}
    assert "input_images" in fields_of(refused(**edit(mode=mode, input_images=[UPLOAD, UPLOAD_2], **extra)))


def test_inpaint_without_a_mask_is_refused() -> None:
    assert fields_of(refused(**edit(mode="inpaint"))) == {"mask"}


def test_inpaint_with_a_mask_passes() -> None:
    req = parse(**edit(mode="inpaint", mask=UPLOAD_2, strength=0.9))
    assert req.mask is not None and req.mask.upload_id == UPLOAD_2["upload_id"]
    assert req.strength == 0.9


@pytest.mark.parametrize("mode", ["instruct", "img2img"])
def test_mask_on_a_non_inpaint_edit_is_refused(mode: str) -> None:
    assert fields_of(refused(**edit(mode=mode, mask=UPLOAD_2))) == {"mask"}


def test_unknown_mode_is_refused() -> None:
    assert "mode" in fields_of(refused(**edit(mode="outpaint")))


@pytest.mark.parametrize(
    "ref",
    [
        {},
        {"upload_id": "upl_0123456789abcdef", "url": "https://images.example.com/a.png"},
        {"url": "http://images.example.com/a.png"},
        {"upload_id": "job_0123456789abcdef"},
        {"upload_id": "upl_0123456789abcdef", "extra": 1},
    ],
    ids=["empty", "both", "http", "wrong-prefix", "unknown-key"],
)
def test_an_image_ref_is_one_upload_id_or_one_https_url(ref: dict[str, Any]) -> None:
    details = refused(**edit(input_images=[ref]))
    assert all(d["field"].startswith("input_images.0") for d in details), details


def test_an_https_image_url_is_accepted() -> None:
    req = parse(**edit(input_images=[URL_REF]))
    assert str(req.input_images[0].url) == URL_REF["url"]


# --- error_details ----------------------------------------------------------------------------------------


def test_error_details_have_dotted_paths_and_plain_messages() -> None:
    details = refused(**edit(input_images=[{"url": "http://x.example.com/a.png"}]), loras=[{"adapter_id": 1}])
    by_field = {d["field"]: d["message"] for d in details}
    assert "input_images.0" in by_field
    assert "loras.0.adapter_id" in by_field
    assert not any(m.startswith("Value error") for m in by_field.values())


def test_error_details_carry_the_batch_index_when_given() -> None:
    with pytest.raises(ValidationError) as info:
        JobRequest.model_validate({"prompt": "", "steps": 0})
    details = error_details(info.value, index=7)
    assert {d["field"] for d in details} == {"prompt", "steps"}
    assert all(d["index"] == 7 for d in details)
    assert all("index" not in d for d in error_details(info.value))


# --- normalized() -----------------------------------------------------------------------------------------


def test_normalized_generate_has_every_default_and_no_edit_fields() -> None:
    data = parse(prompt="  a fox  ").normalized()
    assert data == {
        "kind": "generate",
        "prompt": "a fox",
        "negative_prompt": None,
        "width": 1024,
        "height": 1024,
        "steps": 8,
        "guidance_scale": 0.0,
        "seed": None,
        "num_images": 1,
        "output_format": "png",
        "output_quality": 90,
        "input_images": [],
        "priority": 5,
        "webhook_url": None,
        "metadata": {},
        "loras": [],
        "reuse": False,
    }


def test_normalized_keeps_a_given_seed_and_is_plain_json() -> None:
    data = parse(seed=MAX_SEED, metadata={"order": 1}).normalized()
    assert data["seed"] == MAX_SEED
    assert data["webhook_url"] is None
    assert data["loras"] == []
    assert json.loads(json.dumps(data)) == data


def test_normalized_instruct_edit_has_mode_and_mask_but_no_strength() -> None:
    data = parse(**edit()).normalized()
    assert data["mode"] == "instruct"
    assert data["mask"] is None
    assert data["input_images"] == [{"upload_id": UPLOAD["upload_id"], "url": None}]
    assert "strength" not in data


@pytest.mark.parametrize("mode", ["img2img", "inpaint"])
def test_normalized_img2img_and_inpaint_keep_strength(mode: str) -> None:
    extra = {"mask": UPLOAD_2} if mode == "inpaint" else {}
    data = parse(**edit(mode=mode, **extra)).normalized()
    assert data["mode"] == mode
    assert data["strength"] == 0.6


def test_normalized_is_the_same_for_equivalent_requests() -> None:
    a = parse(prompt="a fox", width=1024).normalized()
    b = JobRequest.model_validate({"width": 1024, "steps": 8, "prompt": " a fox ", "guidance_scale": 0.0}).normalized()
    assert a == b


def test_normalized_round_trips_through_the_model() -> None:
    data = parse(**edit(mode="img2img", strength=0.3, seed=7, metadata={"a": 1})).normalized()
    again = JobRequest.model_validate(json.loads(json.dumps(data))).normalized()
    assert again == data


def _nested(depth: int) -> dict[str, Any]:
    return {"a": json.loads("[" * depth + "]" * depth)}


@pytest.mark.parametrize(
    "metadata",
    [_nested(300), {"score": float("nan")}, {"score": float("inf")}],
    ids=["nested-300", "nan", "infinity"],
)
def test_metadata_that_validates_is_normalized_unchanged(metadata: dict[str, Any]) -> None:
    try:
        req = parse(metadata=metadata)
    except ValidationError as exc:  # refusing it is fine, as long as the field is named
        assert fields_of(error_details(exc)) == {"metadata"}
        return
    assert json.dumps(req.normalized()["metadata"]) == json.dumps(metadata)
