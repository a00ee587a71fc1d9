"""The tiny checkpoint is a real, loadable, deterministic Z-Image-Turbo pipeline folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from diffusers.models.transformers.transformer_z_image import ZImageTransformer2DModel
from diffusers.pipelines.z_image.pipeline_z_image import ZImagePipeline
from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteScheduler
from transformers import Qwen2Tokenizer, Qwen3Model

from deploy.tiny_checkpoint import (
    MARKER_FILE,
    TINY_CHECKPOINT_VERSION,
    build_tiny_turbo,
    ensure_tiny_turbo,
    is_current,
    main,
)

CHINESE = "一名穿著紅色漢服的年輕中國女子，頭戴金色鳳凰頭飾"
RARE = "Zürich ☕ 🐉 Ωμέγα — ключ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢"  # characters the corpus never saw


@pytest.fixture(scope="module")
def pipe(tiny_turbo_dir: Path) -> ZImagePipeline:
    """The tiny checkpoint loaded the way the worker loads the real one."""
    return ZImagePipeline.from_pretrained(tiny_turbo_dir, dtype=torch.float32)


def _weight_files(root: Path) -> dict[str, bytes]:
    """Every weight and tokenizer file of a build, by relative path."""
    names = sorted(root.rglob("*.safetensors")) + [root / "tokenizer" / "tokenizer.json"]
    return {str(path.relative_to(root)): path.read_bytes() for path in names}


def test_build_writes_a_complete_pipeline_folder(tiny_turbo_dir: Path) -> None:
    index = json.loads((tiny_turbo_dir / "model_index.json").read_text())
    assert index["_class_name"] == "ZImagePipeline"
    assert index["tokenizer"] == ["transformers", "Qwen2Tokenizer"]
    assert index["text_encoder"] == ["transformers", "Qwen3Model"]
    assert index["transformer"] == ["diffusers", "ZImageTransformer2DModel"]
    marker = json.loads((tiny_turbo_dir / MARKER_FILE).read_text())
    assert marker == {"version": TINY_CHECKPOINT_VERSION, "seed": 0}
    assert is_current(tiny_turbo_dir, seed=0)
    assert not is_current(tiny_turbo_dir, seed=1)


def test_loads_with_the_real_classes(pipe: ZImagePipeline) -> None:
    assert isinstance(pipe.transformer, ZImageTransformer2DModel)
    assert isinstance(pipe.text_encoder, Qwen3Model)
    assert isinstance(pipe.tokenizer, Qwen2Tokenizer)
    assert isinstance(pipe.vae, AutoencoderKL)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    assert pipe.scheduler.config.shift == 3.0
    assert pipe.scheduler.config.use_dynamic_shifting is False


def test_vae_has_the_flux_layout(pipe: ZImagePipeline) -> None:
    config = pipe.vae.config
    assert pipe.vae_scale_factor == 8
    assert len(config.down_block_types) == 4 and len(config.up_block_types) == 4
    assert config.latent_channels == 16
    assert config.use_quant_conv is False and config.use_post_quant_conv is False
    assert config.scaling_factor == pytest.approx(0.3611)
    assert config.shift_factor == pytest.approx(0.1159)


def test_components_fit_together(pipe: ZImagePipeline) -> None:
    config = pipe.transformer.config
    assert config.in_channels == 16 == pipe.vae.config.latent_channels
    assert config.cap_feat_dim == pipe.text_encoder.config.hidden_size
    assert pipe.text_encoder.config.vocab_size == len(pipe.tokenizer)
    assert sum(config.axes_dims) == config.dim // config.n_heads


def test_rope_tables_cover_2048_images_and_512_token_prompts(pipe: ZImagePipeline) -> None:
    transformer = pipe.transformer
    latent = torch.zeros(16, 1, 2048 // 8, 2048 // 8)  # (C, F, H, W) for a 2048x2048 image
    caption = torch.zeros(512, transformer.config.cap_feat_dim)
    _, _, _, image_ids, caption_ids, _, _ = transformer.patchify_and_embed([latent], [caption], 2, 1)
    ids = torch.cat([caption_ids[0], image_ids[0]])
    assert image_ids[0][:, 1].max().item() == 127  # 128 patches a side
    limits = torch.tensor(transformer.config.axes_lens)
    assert bool((ids.max(dim=0).values < limits).all()), (ids.max(dim=0).values, limits)
    # The real lookup: indexing past a table raises, so this also proves the tables are long enough.
    assert transformer.rope_embedder(ids).shape[0] == len(ids)


def test_tokenizer_has_the_qwen_special_tokens(pipe: ZImagePipeline) -> None:
    tokenizer = pipe.tokenizer
    assert tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.padding_side == "right"
    assert tokenizer.model_max_length >= 512
    for token in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        ids = tokenizer(token, add_special_tokens=False).input_ids
        assert ids == [tokenizer.convert_tokens_to_ids(token)], token


@pytest.mark.parametrize("text", [CHINESE, RARE, "A photo of a cat, 85mm, f/1.8"])
def test_tokenizer_is_byte_level(pipe: ZImagePipeline, text: str) -> None:
    tokenizer = pipe.tokenizer
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == text


def test_chat_template_matches_what_the_pipeline_asks_for(pipe: ZImagePipeline) -> None:
    tokenizer = pipe.tokenizer
    messages = [{"role": "user", "content": CHINESE}]
    wrapped = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=True)
    assert wrapped == f"<|im_start|>user\n{CHINESE}<|im_end|>\n<|im_start|>assistant\n"
    no_think = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    assert no_think == wrapped + "<think>\n\n</think>\n\n"
    ids = tokenizer(wrapped, padding="max_length", max_length=512, truncation=True).input_ids
    assert len(ids) == 512
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert ids[-1] == tokenizer.pad_token_id  # padded on the right


def test_the_pipeline_runs_end_to_end(pipe: ZImagePipeline) -> None:
    generator = torch.Generator("cpu").manual_seed(0)
    image = pipe(CHINESE, width=256, height=256, num_inference_steps=1, guidance_scale=0.0, generator=generator)
    assert image.images[0].size == (256, 256)


def test_same_seed_gives_identical_files(tmp_path: Path, tiny_turbo_dir: Path) -> None:
    again = build_tiny_turbo(tmp_path / "again", seed=0)
    other = build_tiny_turbo(tmp_path / "other", seed=1)
    first = _weight_files(tiny_turbo_dir)
    assert len(first) == 4  # transformer, text encoder, VAE, tokenizer
    assert _weight_files(again) == first
    # The seed must matter, or the equality above would prove nothing.
    different = _weight_files(other)
    assert different["tokenizer/tokenizer.json"] == first["tokenizer/tokenizer.json"]
    assert (
        different["transformer/diffusion_pytorch_model.safetensors"]
        != first["transformer/diffusion_pytorch_model.safetensors"]
    )


def test_build_leaves_the_global_rng_alone(tmp_path: Path) -> None:
    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    build_tiny_turbo(tmp_path / "rng", seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_command_line_and_cache(tmp_path: Path) -> None:
    target = tmp_path / "cli"
    assert main([str(target), "--seed", "3"]) == 0
    assert is_current(target, seed=3)
    stamp = (target / "transformer" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    assert ensure_tiny_turbo(target, seed=3) == target
    assert (target / "transformer" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == stamp
    (target / MARKER_FILE).write_text(json.dumps({"version": TINY_CHECKPOINT_VERSION - 1, "seed": 3}))
    assert not is_current(target, seed=3)
    ensure_tiny_turbo(target, seed=3)
    assert is_current(target, seed=3)


def test_the_tiny_base_has_turbos_components_and_its_own_transformer(
    tiny_turbo_dir: Path, tiny_base_dir: Path, tmp_path: Path
) -> None:
    turbo, base = _weight_files(tiny_turbo_dir), _weight_files(tiny_base_dir)
    assert set(base) == set(turbo)
    for name in (
        "text_encoder/model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
        "tokenizer/tokenizer.json",
    ):
        assert base[name] == turbo[name], name  # byte for byte: shareable with the tiny Turbo
    transformer = "transformer/diffusion_pytorch_model.safetensors"
    assert base[transformer] != turbo[transformer]
    # The command line builds the same folder, and --if-missing keeps it.
    target = tmp_path / "cli-base"
    assert main([str(target), "--base", "--transformer-seed", "1"]) == 0
    assert _weight_files(target) == base
    stamp = (target / transformer).stat().st_mtime_ns
    assert main([str(target), "--base", "--if-missing"]) == 0
    assert (target / transformer).stat().st_mtime_ns == stamp
