"""Build a tiny random-weight checkpoint shaped like Z-Image-Turbo (or Z-Image Base), offline, in a few seconds.

Every component is the real class the Turbo checkpoint uses (ZImageTransformer2DModel, Qwen3Model, a
FLUX-layout AutoencoderKL, FlowMatchEulerDiscreteScheduler, Qwen2Tokenizer), saved with
``ZImagePipeline.save_pretrained``, so ``ZImagePipeline.from_pretrained(DIR)`` runs exactly the code path used
with the real weights.

Usage: ``python -m deploy.tiny_checkpoint DIR [--seed N] [--base [--transformer-seed M]] [--if-missing]``.

``--base`` builds the tiny Base: the very text encoder, tokenizer, VAE and scheduler of the tiny Turbo of the same
``--seed`` (so a worker shares them, as it shares the real Turbo's and Base's), with a transformer of its own
(``--transformer-seed``, default 1): a different model behind the same components.

Dev tooling for tests, benchmarks and ``make checkpoint``: the worker never imports it. The Edit builder,
``deploy.tiny_edit_checkpoint``, builds on this module with a command of its own; this one never imports it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
import transformers

# Defining modules, not `from diffusers import ...`: type checkers resolve the top-level names to dummies.
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from diffusers.models.transformers.transformer_z_image import ZImageTransformer2DModel
from diffusers.pipelines.z_image.pipeline_z_image import ZImagePipeline
from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteScheduler
from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer
from transformers import Qwen2Tokenizer, Qwen3Config, Qwen3Model
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

# Bump whenever the layout, sizes, tokenizer or corpus change: callers cache builds keyed on it.
TINY_CHECKPOINT_VERSION = 1
TINY_BASE_VERSION = 1  # the tiny Base's marker: its own version, its transformer seed beside the shared seed
BASE_TRANSFORMER_SEED = 1
MARKER_FILE = "tiny_checkpoint.json"

TEXT_HIDDEN = 32  # text encoder hidden size == transformer cap_feat_dim
TOKENIZER_VOCAB = 1024  # BPE target; a small corpus may stop short of it
MODEL_MAX_LENGTH = 131072  # what the real Qwen tokenizer declares
WEIGHT_GAIN = 2.0  # transformer weight matrices are scaled by this after the default init

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (PAD_TOKEN, IM_START, IM_END)
THINK_TOKENS = ("<think>", "</think>")  # plain added tokens in Qwen3, not special ones

# Qwen3-style ChatML template. ZImagePipeline calls apply_chat_template(..., add_generation_prompt=True,
# enable_thinking=True), which in Qwen3 yields "<|im_start|>user\n{p}<|im_end|>\n<|im_start|>assistant\n";
# enable_thinking=False appends the empty think block, as Qwen3's own template does.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- set content = message['content'] if message['content'] is string else '' %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + content + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)

# English and Chinese (simplified and traditional) text so common words merge; every other byte still maps
# to one of the 256 byte-level symbols, so no input is ever unknown.
_CORPUS = (
    "<|im_start|>user\nA photo of a cat sitting on a red mat.<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n",
    "Young Chinese woman in red Hanfu, intricate embroidery. Impeccable makeup, red floral forehead pattern.",
    "Elaborate high bun, golden phoenix headdress, red flowers, beads. Holds round folding fan with lady.",
    "Neon lightning-bolt lamp, bright yellow glow, above extended left palm. Soft-lit night background.",
    "A futuristic city at night with neon lights, rain on the street, reflections, cinematic lighting, 4k.",
    "A beautiful landscape with mountains and a lake at sunrise, mist over the water, pine trees.",
    "Portrait of an old man with a white beard, studio lighting, 85mm lens, shallow depth of field.",
    "A bowl of ramen with an egg, steam rising, wooden table, top view, food photography.",
    'Poster with the title "Z-Image Turbo" in bold letters, minimal design, blue and orange colors.',
    "一名穿著紅色漢服的年輕中國女子，精緻的刺繡，完美的妝容，額頭上有紅色花卉圖案。",
    "一名穿着红色汉服的年轻中国女子，精致的刺绣，完美的妆容，额头上有红色花卉图案。",
    "一幅为名为“造相”的项目设计的创意海报。一辆复古蒸汽小火车化身为巨大的拉链头，正拉开厚厚的冬日积雪。",
    "西安大雁塔的夜景，远处模糊的彩色灯光，柔和的户外光线，高清摄影。",
    "一只猫坐在红色的垫子上，阳光从窗户照进来，温暖的色调。",
    "山水画，高山流水，云雾缭绕，水墨风格，中国传统绘画。",
    "The quick brown fox jumps over the lazy dog. 0123456789 !?.,;:'\"()[]{}<>-_=+*/\\|@#$%^&~`",
)


def build_tokenizer() -> Qwen2Tokenizer:
    """Train a small byte-level BPE on the built-in corpus and wrap it in the Qwen2 tokenizer class."""
    bpe = Tokenizer(BPE())
    # Same normalizer and pre-tokenizer as Qwen2Tokenizer, so the trained merges apply to its splits.
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = BpeTrainer(
        vocab_size=TOKENIZER_VOCAB,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_CORPUS, trainer)
    model = json.loads(bpe.to_str())["model"]
    tokenizer = Qwen2Tokenizer(
        vocab=model["vocab"],
        merges=[tuple(pair) for pair in model["merges"]],  # type: ignore[misc]  # pairs, as BPE takes them
        extra_special_tokens=[IM_START, IM_END],
        padding_side="right",
        model_max_length=MODEL_MAX_LENGTH,
    )
    tokenizer.add_tokens(list(THINK_TOKENS))
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_text_encoder(vocab_size: int, pad_token_id: int) -> Qwen3Model:
    """A two-layer Qwen3Model; the pipeline reads its second-to-last hidden state."""
    config = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=TEXT_HIDDEN,
        intermediate_size=2 * TEXT_HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=40960,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        tie_word_embeddings=True,
        pad_token_id=pad_token_id,
        eos_token_id=pad_token_id,
    )
    return Qwen3Model(config).eval()


def build_transformer(**extra: Any) -> ZImageTransformer2DModel:
    """A two-layer ZImageTransformer2DModel with the real RoPE table lengths (``extra``: more config)."""
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=16,
        dim=64,
        n_layers=2,
        n_refiner_layers=1,
        n_heads=2,
        n_kv_heads=2,
        cap_feat_dim=TEXT_HIDDEN,
        # head_dim 32 == sum(axes_dims). axes_lens as in the real model: 1536 caption/frame positions (a
        # 512-token prompt padded to 32, then the image's frame index), 512 patches a side (2048 px: 128).
        axes_dims=[8, 12, 12],
        axes_lens=[1536, 512, 512],
        **extra,
    ).eval()
    # At default init the prompt barely moves the image (about 10/255 at most); doubling every weight matrix
    # makes different prompts clearly different images, so tests can tell a wrong or double-wrapped prompt.
    with torch.no_grad():
        for param in transformer.parameters():
            if param.ndim == 2:
                param.mul_(WEIGHT_GAIN)
    return transformer


def build_vae() -> AutoencoderKL:
    """A FLUX-layout AutoencoderKL: four blocks (scale factor 8), 16 latent channels, no quant convs."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        act_fn="silu",
        latent_channels=16,
        norm_num_groups=4,
        sample_size=1024,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        force_upcast=True,
        use_quant_conv=False,
        use_post_quant_conv=False,
    ).eval()


def build_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """The Turbo scheduler config: static shift 3.0."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)


def build_pipeline(seed: int = 0, transformer_seed: int | None = None) -> ZImagePipeline:
    """Assemble the tiny pipeline in memory; the same seed gives identical weights. ``transformer_seed``: the
    transformer drawn from its own seed, every other component exactly the ``seed`` build's (the tiny Base)."""
    tokenizer = build_tokenizer()
    # fork_rng keeps the caller's global RNG untouched while the seed fixes every initialiser.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = build_text_encoder(len(tokenizer), tokenizer.pad_token_id)
        transformer = build_transformer()
        vae = build_vae()
        if transformer_seed is not None:
            torch.manual_seed(transformer_seed)
            transformer = build_transformer()
    # The ignores: diffusers annotates these two with a dummy scheduler class and AutoTokenizer.
    return ZImagePipeline(
        scheduler=build_scheduler(),  # type: ignore[arg-type]
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,  # type: ignore[arg-type]
        transformer=transformer,
    )


def save_marked(pipe: Any, path: Path, *, seed: int, version: int, marker: str = MARKER_FILE) -> Path:
    """Save ``pipe`` to ``path`` and then a marker naming its build version and seed; returns the path."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    # Remove the marker first so a build interrupted half-way never looks complete.
    (path / marker).unlink(missing_ok=True)
    pipe.save_pretrained(path, safe_serialization=True)
    (path / marker).write_text(json.dumps({"version": version, "seed": seed}, indent=2) + "\n")
    return path


def has_marker(path: Path, *, seed: int, version: int, marker: str = MARKER_FILE) -> bool:
    """True when ``path`` holds a finished build of this version and seed."""
    try:
        info = json.loads((Path(path) / marker).read_text())
    except (OSError, ValueError):
        return False
    return bool(info == {"version": version, "seed": seed})


def build_tiny_turbo(path: Path, seed: int = 0) -> Path:
    """Write a complete tiny Z-Image-Turbo pipeline folder to ``path`` and return it."""
    return save_marked(build_pipeline(seed), path, seed=seed, version=TINY_CHECKPOINT_VERSION)


def is_current(path: Path, seed: int = 0) -> bool:
    """True when ``path`` holds a finished build of this version and seed."""
    return has_marker(path, seed=seed, version=TINY_CHECKPOINT_VERSION)


def ensure_tiny_turbo(path: Path, seed: int = 0) -> Path:
    """Build the tiny checkpoint at ``path`` unless a current build is already there."""
    return Path(path) if is_current(path, seed) else build_tiny_turbo(path, seed)


def build_tiny_base(path: Path, seed: int = 0, transformer_seed: int = BASE_TRANSFORMER_SEED) -> Path:
    """Write a tiny Z-Image Base pipeline folder to ``path``: the ``seed`` Turbo's text encoder, tokenizer and VAE,
    a transformer of its own from ``transformer_seed``."""
    pipe = build_pipeline(seed, transformer_seed=transformer_seed)
    return save_marked(pipe, path, seed=_base_marker_seed(seed, transformer_seed), version=TINY_BASE_VERSION)


def _base_marker_seed(seed: int, transformer_seed: int) -> int:
    """Both seeds of a tiny Base build as the marker's one number."""
    return seed * 1_000_003 + transformer_seed


def ensure_tiny_base(path: Path, seed: int = 0, transformer_seed: int = BASE_TRANSFORMER_SEED) -> Path:
    """Build the tiny Base at ``path`` unless a current build is already there."""
    current = has_marker(path, seed=_base_marker_seed(seed, transformer_seed), version=TINY_BASE_VERSION)
    return Path(path) if current else build_tiny_base(path, seed, transformer_seed)


def main(argv: list[str] | None = None) -> int:
    """Command line entry point: build (or, with --if-missing, reuse) a tiny Turbo checkpoint."""
    parser = argparse.ArgumentParser(prog="python -m deploy.tiny_checkpoint", description=__doc__.splitlines()[0])
    parser.add_argument("dir", type=Path, help="output folder (a diffusers pipeline folder)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--if-missing", action="store_true", help="keep an existing build of this version")
    parser.add_argument("--base", action="store_true", help="the tiny Base: Turbo's components, its own transformer")
    parser.add_argument("--transformer-seed", type=int, default=BASE_TRANSFORMER_SEED, help="the Base transformer's")
    args = parser.parse_args(argv)
    # The shard-writing progress bar is noise for a build that takes a few seconds.
    transformers.utils.logging.disable_progress_bar()
    if args.base:
        build_base = ensure_tiny_base if args.if_missing else build_tiny_base
        print(build_base(args.dir, args.seed, args.transformer_seed))
        return 0
    build = ensure_tiny_turbo if args.if_missing else build_tiny_turbo
    print(build(args.dir, args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
