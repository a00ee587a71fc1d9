"""LoRA adapter files checked without running anything: real peft and diffusers-layout files pass, every broken or
hostile one is refused naming its first bad tensor (422), and what is not a safetensors file at all is a 415."""

from __future__ import annotations

import io
import json
import math
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save as save_bytes

from core.adapter_shapes import linear_layers
from core.errors import UnsupportedMediaType, ValidationFailed
from core.lora_file import MAX_HEADER_BYTES, LoraChecker, check_lora
from deploy.tiny_adapter import DEFAULT_TARGETS, build_tiny_adapter, random_lora, save_lora

TINY = {
    "all_patch_size": [2],
    "all_f_patch_size": [1],
    "in_channels": 16,
    "dim": 64,
    "n_layers": 2,
    "n_refiner_layers": 1,
    "n_heads": 2,
    "n_kv_heads": 2,
    "cap_feat_dim": 32,
}
LAYERS = linear_layers(TINY)
FULL = linear_layers({})
Q = "layers.0.attention.to_q"  # (64, 64) in the tiny table
W1 = "layers.0.feed_forward.w1"  # (64, 170)


@pytest.fixture(scope="module")
def tiny_adapter(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A peft LoRA (rank 4) on a tiny transformer, saved the way diffusers saves one."""
    from deploy.tiny_checkpoint import build_transformer

    base = tmp_path_factory.mktemp("tiny-base")
    torch.manual_seed(0)
    build_transformer().save_pretrained(base / "transformer")
    assert json.loads((base / "transformer" / "config.json").read_text())["dim"] == TINY["dim"]
    return build_tiny_adapter(base, base / "adapter.safetensors", seed=1).read_bytes()


def pair(module: str, rank: int = 4, prefix: str = "transformer.", a: str = "lora_A", b: str = "lora_B") -> dict:
    """A right-shaped A/B pair of ``module`` in the tiny table."""
    fan_in, fan_out = LAYERS[module]
    return {
        f"{prefix}{module}.{a}.weight": torch.full((rank, fan_in), 0.01),
        f"{prefix}{module}.{b}.weight": torch.full((fan_out, rank), 0.02),
    }


def file_of(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    return save_bytes(tensors, metadata=metadata)


def crafted(entries: dict[str, Any], data: bytes | None = None, pad_to: int | None = None) -> bytes:
    """A safetensors file written by hand from its header entries (data: zeros as the offsets say, unless given)."""
    header = json.dumps(entries).encode()
    if data is None:
        ends = [e["data_offsets"][1] for k, e in entries.items() if k != "__metadata__" and isinstance(e, dict)]
        data = bytes(max(ends, default=0))
    return struct.pack("<Q", len(header)) + header + data


def entry(dtype: str, shape: list[int], begin: int) -> dict[str, Any]:
    size = math.prod(shape) * {"F16": 2, "BF16": 2, "F32": 4}.get(dtype, 8)
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, begin + size]}


def check(data: bytes, **kwargs: Any) -> Any:
    return check_lora(data, LAYERS, max_rank=kwargs.pop("max_rank", 128), **kwargs)


def refused(data: bytes, tensor: str | None, *words: str, max_rank: int = 128) -> str:
    """The file is a 422 whose message and detail name ``tensor`` (and hold ``words``)."""
    with pytest.raises(ValidationFailed) as info:
        check(data, max_rank=max_rank)
    exc = info.value
    assert exc.details == [{"field": "file", "message": exc.message}]
    if tensor is not None:
        assert f"tensor '{tensor}'" in exc.message
    for word in words:
        assert word in exc.message, exc.message
    return exc.message


def not_safetensors(data: bytes, *words: str) -> str:
    with pytest.raises(UnsupportedMediaType) as info:
        check(data)
    message = info.value.message
    assert "only .safetensors adapters are accepted" in message
    assert info.value.details == [{"field": "file", "message": message}]
    for word in words:
        assert word in message, message
    return message


# --- accepted files ---------------------------------------------------------------------------------------


def test_a_peft_adapter_saved_by_diffusers_is_accepted(tiny_adapter: bytes) -> None:
    summary = check(tiny_adapter)
    suffixes = tuple(f".{t}" for t in DEFAULT_TARGETS)
    expected = sorted(m for m in LAYERS if m.endswith(suffixes))
    assert len(expected) == 4 * 7  # two layers, one noise and one context refiner; seven projections each
    assert (summary.rank, summary.target_modules, summary.tensors) == (4, expected, 2 * len(expected))
    assert summary.size == len(tiny_adapter)


@pytest.mark.parametrize("chunk", [1, 7, 8, 4096, 1 << 20])
def test_fed_in_any_pieces_the_header_is_checked_once_it_is_complete(tiny_adapter: bytes, chunk: int) -> None:
    checker = LoraChecker(LAYERS, max_rank=128)
    header_end = 8 + struct.unpack("<Q", tiny_adapter[:8])[0]
    for start in range(0, len(tiny_adapter), chunk):
        piece = tiny_adapter[start : start + chunk]
        checker.feed(piece)
        assert checker.header_checked == (start + len(piece) >= header_end)
    assert checker.finish() == check(tiny_adapter)


def test_a_rank_32_adapter_on_every_projection_of_the_full_size_model_is_accepted(tmp_path: Path) -> None:
    state = random_lora(FULL, rank=32)
    path = save_lora(state, tmp_path / "full.safetensors")
    summary = check_lora(path.read_bytes(), FULL, max_rank=128)
    assert summary.rank == 32
    assert len(summary.target_modules) == (30 + 2 + 2) * 7  # layers, noise and context refiners
    assert summary.tensors == len(state) == 2 * len(summary.target_modules)
    assert summary.size == path.stat().st_size


def test_the_diffusion_model_layout_with_alphas_is_accepted() -> None:
    tensors = {
        **pair(Q, prefix="diffusion_model.", a="lora_down", b="lora_up"),
        f"diffusion_model.{Q}.alpha": torch.tensor(4.0),
    }
    tensors |= pair(W1, rank=8, prefix="diffusion_model.", a="lora_down", b="lora_up")
    summary = check(file_of(tensors))
    assert (summary.rank, summary.target_modules, summary.tensors) == (8, [Q, W1], 5)
    ab = {**pair(Q, prefix="diffusion_model."), f"diffusion_model.{Q}.alpha": torch.tensor([2.0], dtype=torch.bfloat16)}
    assert check(file_of(ab)).target_modules == [Q]


def test_f16_and_bf16_are_accepted_and_ranks_may_differ_per_module() -> None:
    tensors = {k: v.to(torch.float16) for k, v in pair(Q, rank=2).items()}
    tensors |= {k: v.to(torch.bfloat16) for k, v in pair(W1, rank=16).items()}
    assert check(file_of(tensors)).rank == 16


def test_metadata_of_strings_is_accepted() -> None:
    config = json.dumps({"transformer.r": 4, "transformer.use_dora": False})
    assert check(file_of(pair(Q), {"lora_adapter_metadata": config, "format": "pt"})).rank == 4


# --- not a safetensors file: 415 --------------------------------------------------------------------------


def test_a_pickle_is_refused_from_its_first_byte() -> None:
    not_safetensors(pickle.dumps({"transformer.x.lora_A.weight": [1.0, 2.0]}), "pickle")
    checker = LoraChecker(LAYERS, max_rank=4)
    with pytest.raises(UnsupportedMediaType):
        checker.feed(b"\x80")


def test_a_torch_save_zip_is_refused(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    torch.save(pair(Q), buffer)
    not_safetensors(buffer.getvalue(), "ZIP")
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps({"a": 1}))
    not_safetensors(archive.getvalue(), "ZIP")


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (b"", ("0 bytes",)),
        (b"short", ("5 bytes",)),
        (b'{"transformer.layers.0.attention.to_q.lora_A.weight": {}}', ("header of",)),  # JSON text, not a prefix
        (struct.pack("<Q", MAX_HEADER_BYTES + 1) + b"{}", ("header of",)),
        (struct.pack("<Q", 0), ("header of 0 bytes",)),
        (struct.pack("<Q", 4) + b"[12]", ("start with '{'",)),
        (struct.pack("<Q", 4) + b"{]]}", ("not JSON",)),
        (struct.pack("<Q", 6) + b'{"a"\xff}', ("not JSON",)),
        (struct.pack("<Q", 1000) + b'{"a": 1}', ("ends after",)),  # the header runs past the end
    ],
    ids=[
        "empty",
        "short",
        "json-text",
        "huge-header",
        "zero-header",
        "list-header",
        "bad-json",
        "bad-utf8",
        "past-end",
    ],
)
def test_what_is_not_a_safetensors_file_is_415(data: bytes, words: tuple[str, ...]) -> None:
    not_safetensors(data, *words)


def test_a_nonsense_header_length_is_refused_before_the_header_arrives() -> None:
    checker = LoraChecker(LAYERS, max_rank=4)
    with pytest.raises(UnsupportedMediaType):
        checker.feed(struct.pack("<Q", 1 << 40))


# --- a safetensors file that breaks a rule: 422 naming the first bad tensor -----------------------------------


def test_a_disallowed_dtype_is_named() -> None:
    tensors = {**pair(Q), f"transformer.{W1}.lora_A.weight": torch.zeros(4, 64, dtype=torch.float64)}
    tensors[f"transformer.{W1}.lora_B.weight"] = torch.zeros(170, 4)
    refused(file_of(tensors), f"transformer.{W1}.lora_A.weight", "F64")
    ints = {**pair(Q), f"transformer.{Q}.lora_A.weight": torch.zeros(4, 64, dtype=torch.int8)}
    refused(file_of(ints), f"transformer.{Q}.lora_A.weight", "I8")


def test_shapes_that_do_not_fit_the_layer_are_named() -> None:
    wrong_in = {**pair(Q), f"transformer.{Q}.lora_A.weight": torch.zeros(4, 65)}
    refused(file_of(wrong_in), f"transformer.{Q}.lora_A.weight", "[rank, 64]")
    wrong_out = {**pair(W1), f"transformer.{W1}.lora_B.weight": torch.zeros(64, 4)}
    refused(file_of(wrong_out), f"transformer.{W1}.lora_B.weight", "[170, rank]")
    three_d = {**pair(Q), f"transformer.{Q}.lora_A.weight": torch.zeros(4, 64, 1)}
    refused(file_of(three_d), f"transformer.{Q}.lora_A.weight", "[rank, 64]")
    ranks = {**pair(Q), f"transformer.{Q}.lora_B.weight": torch.zeros(64, 8)}
    refused(file_of(ranks), f"transformer.{Q}.lora_B.weight", "rank 8", "rank 4")


def test_a_rank_over_the_limit_is_named() -> None:
    refused(file_of(pair(Q, rank=16)), f"transformer.{Q}.lora_A.weight", "rank 16", "1 to 8", max_rank=8)
    assert check(file_of(pair(Q, rank=8)), max_rank=8).rank == 8
    refused(file_of(pair(Q, rank=0)), f"transformer.{Q}.lora_A.weight", "rank 0")


@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("transformer.layers.7.attention.to_q.lora_A.weight", ("module 'layers.7.attention.to_q'",)),
        ("transformer.layers.0.attention.norm_q.lora_A.weight", ("does not have",)),
        ("transformer.layers.0.attention.to_q.dora_scale", ("DoRA",)),
        ("transformer.layers.0.attention.to_q.lora_magnitude_vector", ("not a LoRA weight name",)),
        ("lora_unet_layers_0_attention_to_q.lora_down.weight", ("lora_unet_",)),
        ("text_encoder.layers.0.self_attn.q_proj.lora_A.weight", ("text-encoder",)),
        ("lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight", ("text-encoder",)),
        ("transformer.layers.0.attention.to_q.lora_A.bias", ("not a LoRA weight name",)),
        ("transformer.layers.0.attention.to_q.lokr_w1", ("LoKr",)),
        ("unet.layers.0.attention.to_q.lora_A.weight", ("not a LoRA weight name",)),
        ("transformer.layers.0.attention.to_q.default.lora_A.weight", ("does not have",)),
    ],
)
def test_names_that_are_not_lora_weights_of_the_transformer_are_named(name: str, words: tuple[str, ...]) -> None:
    tensors = {**pair(Q), name: torch.zeros(4, 64)}
    refused(file_of(tensors), name, *words)


def test_a_module_needs_both_halves() -> None:
    refused(file_of({f"transformer.{Q}.lora_A.weight": torch.zeros(4, 64)}), f"transformer.{Q}.lora_A.weight", "up (B)")
    only_b = {f"transformer.{Q}.lora_B.weight": torch.zeros(64, 4)}
    refused(file_of(only_b), f"transformer.{Q}.lora_B.weight", "down (A)")
    alpha_only = {**pair(W1, prefix="diffusion_model."), f"diffusion_model.{Q}.alpha": torch.tensor(1.0)}
    refused(file_of(alpha_only), f"diffusion_model.{Q}.alpha", "down (A)")


def test_layouts_may_not_be_mixed_and_alphas_belong_to_the_diffusion_model_layout() -> None:
    mixed = {**pair(Q), **pair(W1, prefix="diffusion_model.")}
    refused(file_of(mixed), f"transformer.{Q}.lora_A.weight", "mixes")  # saved sorted: diffusion_model.* first
    styles = {**pair(Q, prefix="diffusion_model."), **pair(W1, prefix="diffusion_model.", a="lora_down", b="lora_up")}
    refused(file_of(styles), None, "mixes")
    alpha = {**pair(Q), f"diffusion_model.{Q}.alpha": torch.tensor(4.0)}
    refused(file_of(alpha), f"diffusion_model.{Q}.alpha", "alpha")
    big_alpha = {**pair(Q, prefix="diffusion_model."), f"diffusion_model.{Q}.alpha": torch.zeros(2)}
    refused(file_of(big_alpha), f"diffusion_model.{Q}.alpha", "one number")


def test_a_file_without_lora_weights_is_refused() -> None:
    with pytest.raises(ValidationFailed, match="no LoRA weights"):
        check(crafted({"__metadata__": {"format": "pt"}}))


def test_bad_metadata_is_refused() -> None:
    with pytest.raises(ValidationFailed, match="__metadata__"):
        check(crafted({"__metadata__": {"r": 4}, **{k: v for k, v in layout_ok().items()}}))
    dora = json.dumps({"transformer.use_dora": True})
    with pytest.raises(ValidationFailed, match="DoRA"):
        check(file_of(pair(Q), {"lora_adapter_metadata": dora}))
    with pytest.raises(ValidationFailed, match="lora_adapter_metadata"):
        check(file_of(pair(Q), {"lora_adapter_metadata": "[1, 2]"}))


def layout_ok() -> dict[str, Any]:
    """Header entries of one right-shaped F32 pair of Q, back to back."""
    a = entry("F32", [4, 64], 0)
    return {
        f"transformer.{Q}.lora_A.weight": a,
        f"transformer.{Q}.lora_B.weight": entry("F32", [64, 4], a["data_offsets"][1]),
    }


def test_crafted_pair_passes_so_the_broken_variants_below_test_one_thing_each() -> None:
    assert check(crafted(layout_ok())).tensors == 2


def test_offsets_with_a_gap_an_overlap_or_the_wrong_size_are_named() -> None:
    a, b = f"transformer.{Q}.lora_A.weight", f"transformer.{Q}.lora_B.weight"
    gap = layout_ok()
    gap[b]["data_offsets"] = [gap[b]["data_offsets"][0] + 4, gap[b]["data_offsets"][1] + 4]
    refused(crafted(gap), b, "gap")
    late_start = layout_ok()
    late_start[a]["data_offsets"] = [8, 1032]
    late_start[b]["data_offsets"] = [1032, 2056]
    refused(crafted(late_start), a, "gap")
    overlap = layout_ok()
    overlap[b]["data_offsets"] = [1000, 2024]
    refused(crafted(overlap), b, "overlapping")
    size = layout_ok()
    size[b]["data_offsets"] = [1024, 2000]
    refused(crafted(size), b, "needs 1024")
    backwards = layout_ok()
    backwards[b]["data_offsets"] = [2048, 1024]
    refused(crafted(backwards), b, "needs 1024")


@pytest.mark.parametrize(
    ("field", "value"),
    [("shape", [4, -64]), ("shape", "4x64"), ("shape", [4.0, 64]), ("data_offsets", [0]), ("data_offsets", [True, 1])],
)
def test_malformed_entries_are_named(field: str, value: Any) -> None:
    entries = layout_ok()
    entries[f"transformer.{Q}.lora_A.weight"][field] = value
    refused(crafted(entries, data=bytes(2048)), f"transformer.{Q}.lora_A.weight", field)


def test_an_entry_with_extra_or_missing_fields_is_named() -> None:
    extra = layout_ok()
    extra[f"transformer.{Q}.lora_B.weight"]["note"] = "x"
    refused(crafted(extra), f"transformer.{Q}.lora_B.weight", "exactly")
    missing = layout_ok()
    del missing[f"transformer.{Q}.lora_B.weight"]["dtype"]
    refused(crafted(missing), f"transformer.{Q}.lora_B.weight", "exactly")


def test_a_name_given_twice_is_refused() -> None:
    name = f"transformer.{Q}.lora_A.weight"
    text = json.dumps(layout_ok())
    duplicated = text[:-1] + f', "{name}": ' + json.dumps(entry("F32", [4, 64], 2048)) + "}"
    header = duplicated.encode()
    data = struct.pack("<Q", len(header)) + header + bytes(3072)
    message = refused(data, None, name, "twice")
    assert name in message


def test_a_truncated_file_names_the_tensor_cut_short(tiny_adapter: bytes) -> None:
    header_end = 8 + struct.unpack("<Q", tiny_adapter[:8])[0]
    header = json.loads(tiny_adapter[8:header_end])
    by_offset = sorted((v["data_offsets"], k) for k, v in header.items() if k != "__metadata__")
    (_, cut_end), last = by_offset[-1]
    refused(tiny_adapter[:-1], last, "cut short", f"{len(tiny_adapter) - 1} bytes")
    (begin, _), third = by_offset[2]
    refused(tiny_adapter[: header_end + begin + 1], third, "cut short")
    refused(tiny_adapter[:header_end], by_offset[0][1], "cut short")


def test_bytes_after_the_last_tensor_are_refused_as_they_arrive(tiny_adapter: bytes) -> None:
    header = json.loads(tiny_adapter[8 : 8 + struct.unpack("<Q", tiny_adapter[:8])[0]])
    last = max((v["data_offsets"][1], k) for k, v in header.items() if k != "__metadata__")[1]
    refused(tiny_adapter + b"\0", last, "past its last tensor")
    checker = LoraChecker(LAYERS, max_rank=128)
    checker.feed(tiny_adapter)
    with pytest.raises(ValidationFailed):
        checker.feed(b"more")


def test_a_bad_header_is_refused_before_any_data_arrives() -> None:
    data = file_of({**pair(Q), f"transformer.{Q}.dora_scale": torch.zeros(64, 1)})
    header_end = 8 + struct.unpack("<Q", data[:8])[0]
    checker = LoraChecker(LAYERS, max_rank=128)
    checker.feed(data[: header_end - 1])
    with pytest.raises(ValidationFailed, match="DoRA"):
        checker.feed(data[header_end - 1 : header_end])


def test_the_field_named_is_the_callers() -> None:
    with pytest.raises(ValidationFailed) as info:
        check_lora(file_of(pair(Q, rank=9)), LAYERS, max_rank=8, field="url")
    assert info.value.details[0]["field"] == "url"
    with pytest.raises(UnsupportedMediaType) as media:
        check_lora(pickle.dumps(1), LAYERS, max_rank=8, field="url")
    assert media.value.details[0]["field"] == "url"
