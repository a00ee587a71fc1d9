"""Build a tiny random-weight checkpoint shaped like a Z-Image Omni/Edit model, offline, in a few seconds.

The folder loads with ``ZImageOmniPipeline.from_pretrained(DIR)``: the real classes (a SigLIP2 vision model and
its image processor, a ZImageTransformer2DModel with ``siglip_feat_dim``), next to the tokenizer, text encoder,
VAE and scheduler of the tiny Turbo checkpoint of the same seed, with the same configs and weights. That is the
layout of a real Edit checkpoint that reuses Turbo's Qwen3 encoder and VAE, so the worker's component sharing
runs in tests exactly as it would with real weights.

Usage: ``python -m deploy.tiny_edit_checkpoint DIR [--seed N] [--if-missing]``. Dev tooling, like
``deploy.tiny_checkpoint``, whose builders it uses.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import transformers
from diffusers.models.transformers.transformer_z_image import ZImageTransformer2DModel
from diffusers.pipelines.z_image.pipeline_z_image_omni import ZImageOmniPipeline
from transformers import Siglip2ImageProcessor, Siglip2VisionConfig, Siglip2VisionModel

from deploy.tiny_checkpoint import build_pipeline, build_transformer, has_marker, save_marked

# Bump whenever the layout or sizes change: callers cache builds keyed on it.
TINY_EDIT_CHECKPOINT_VERSION = 1
MARKER_FILE = "tiny_edit_checkpoint.json"

SIGLIP_HIDDEN = 32  # SigLIP2 hidden size == transformer siglip_feat_dim (1152 in so400m)
SIGLIP_PATCH = 16
# Patches per condition image the processor keeps (256 in the naflex checkpoints); a square number, because
# the model's position table is sqrt(num_patches) a side and is interpolated to each image's patch grid.
SIGLIP_MAX_PATCHES = 64


def build_siglip() -> Siglip2VisionModel:
    """A one-layer SigLIP2 vision tower; the pipeline reads its last hidden state per patch."""
    config = Siglip2VisionConfig(
        hidden_size=SIGLIP_HIDDEN,
        intermediate_size=2 * SIGLIP_HIDDEN,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_channels=3,
        patch_size=SIGLIP_PATCH,
        num_patches=SIGLIP_MAX_PATCHES,
    )
    return Siglip2VisionModel(config).eval()


def build_siglip_processor() -> Siglip2ImageProcessor:
    """The SigLIP2 naflex image processor at the tiny patch budget (torchvision-backed in transformers 5)."""
    return Siglip2ImageProcessor(patch_size=SIGLIP_PATCH, max_num_patches=SIGLIP_MAX_PATCHES)


def build_omni_transformer() -> ZImageTransformer2DModel:
    """The tiny Turbo transformer's shape (and weight gain) plus the SigLIP embedder and refiner."""
    return build_transformer(siglip_feat_dim=SIGLIP_HIDDEN)


def build_omni_pipeline(seed: int = 0) -> ZImageOmniPipeline:
    """Assemble the tiny Omni pipeline in memory; the same seed gives identical weights."""
    # The tiny Turbo of this seed supplies tokenizer, text encoder, VAE and scheduler: identical configs and
    # weights, so an engine holding that Turbo shares them instead of loading copies.
    turbo = build_pipeline(seed)
    with torch.random.fork_rng(devices=[]):
        # Offset so the Omni-only modules do not replay the Turbo initialiser's random stream.
        torch.manual_seed(seed + 1_000_003)
        siglip = build_siglip()
        transformer = build_omni_transformer()
    return ZImageOmniPipeline(
        scheduler=turbo.scheduler,
        vae=turbo.vae,
        text_encoder=turbo.text_encoder,
        tokenizer=turbo.tokenizer,
        transformer=transformer,
        siglip=siglip,
        siglip_processor=build_siglip_processor(),
    )


def build_tiny_omni(path: Path, seed: int = 0) -> Path:
    """Write a complete tiny Z-Image Omni pipeline folder to ``path`` and return it."""
    return save_marked(
        build_omni_pipeline(seed), path, seed=seed, version=TINY_EDIT_CHECKPOINT_VERSION, marker=MARKER_FILE
    )


def is_current(path: Path, seed: int = 0) -> bool:
    """True when ``path`` holds a finished build of this version and seed."""
    return has_marker(path, seed=seed, version=TINY_EDIT_CHECKPOINT_VERSION, marker=MARKER_FILE)


def ensure_tiny_omni(path: Path, seed: int = 0) -> Path:
    """Build the tiny Omni checkpoint at ``path`` unless a current build is already there."""
    return Path(path) if is_current(path, seed) else build_tiny_omni(path, seed)


def main(argv: list[str] | None = None) -> int:
    """Command line entry point: build (or, with --if-missing, reuse) a tiny Omni checkpoint."""
    parser = argparse.ArgumentParser(
        prog="python -m deploy.tiny_edit_checkpoint", description=__doc__.splitlines()[0]
    )
    parser.add_argument("dir", type=Path, help="output folder (a diffusers pipeline folder)")
    parser.add_argument("--seed", type=int, default=0, help="use the seed of the tiny Turbo it pairs with")
    parser.add_argument("--if-missing", action="store_true", help="keep an existing build of this version")
    args = parser.parse_args(argv)
    # The shard-writing progress bar is noise for a build that takes a few seconds.
    transformers.utils.logging.disable_progress_bar()
    build = ensure_tiny_omni if args.if_missing else build_tiny_omni
    print(build(args.dir, args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
