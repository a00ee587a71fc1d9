"""The Z-Image transformer's linear layers, by name, with their (in, out) features: what a LoRA may target.

Computed from the transformer's ``config.json`` the way diffusers 0.42.1 builds ``ZImageTransformer2DModel``
(``transformer_z_image.py``), so the API can check an adapter against the served model without torch. A test
checks this table against the real class's ``named_modules()`` for the tiny config and for the published one.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pure otherwise: the GPU benchmark imports this module on a host without the service's packages
    from core.settings import Settings

ADALN_EMBED_DIM = 256  # diffusers' ADALN_EMBED_DIM
TIMESTEP_FREQUENCIES = 256  # TimestepEmbedder's frequency_embedding_size
TIMESTEP_MID = 1024  # TimestepEmbedder's mid_size in ZImageTransformer2DModel

# Tongyi-MAI/Z-Image-Turbo's transformer (and Z-Image-Base's): the class defaults of diffusers 0.42.1.
ZIMAGE_TRANSFORMER: dict[str, Any] = {
    "all_patch_size": [2],
    "all_f_patch_size": [1],
    "in_channels": 16,
    "dim": 3840,
    "n_layers": 30,
    "n_refiner_layers": 2,
    "n_heads": 30,
    "n_kv_heads": 30,
    "cap_feat_dim": 2560,
}

Shape = tuple[int, int]  # (in_features, out_features)


def _block(prefix: str, dim: int, *, modulation: bool) -> dict[str, Shape]:
    """One ZImageTransformerBlock: attention (every projection dim -> dim), SwiGLU feed-forward, adaLN."""
    hidden = int(dim / 3 * 8)
    layers: dict[str, Shape] = {f"{prefix}.attention.{p}": (dim, dim) for p in ("to_q", "to_k", "to_v", "to_out.0")}
    layers[f"{prefix}.feed_forward.w1"] = (dim, hidden)
    layers[f"{prefix}.feed_forward.w2"] = (hidden, dim)
    layers[f"{prefix}.feed_forward.w3"] = (dim, hidden)
    if modulation:
        layers[f"{prefix}.adaLN_modulation.0"] = (min(dim, ADALN_EMBED_DIM), 4 * dim)
    return layers


def linear_layers(config: Mapping[str, Any]) -> dict[str, Shape]:
    """Every ``nn.Linear`` of a Z-Image transformer with this config (Omni's SigLIP layers included), by name."""
    c = {**ZIMAGE_TRANSFORMER, **config}
    dim, channels = int(c["dim"]), int(c["in_channels"])
    small = min(dim, ADALN_EMBED_DIM)
    layers: dict[str, Shape] = {}
    for patch, frames in zip(c["all_patch_size"], c["all_f_patch_size"], strict=True):
        key = f"{patch}-{frames}"
        pixels = int(patch) * int(patch) * int(frames) * channels
        layers[f"all_x_embedder.{key}"] = (pixels, dim)
        layers[f"all_final_layer.{key}.linear"] = (dim, pixels)
        layers[f"all_final_layer.{key}.adaLN_modulation.1"] = (small, dim)
    for i in range(int(c["n_refiner_layers"])):
        layers |= _block(f"noise_refiner.{i}", dim, modulation=True)
        layers |= _block(f"context_refiner.{i}", dim, modulation=False)
    layers["t_embedder.mlp.0"] = (TIMESTEP_FREQUENCIES, TIMESTEP_MID)
    layers["t_embedder.mlp.2"] = (TIMESTEP_MID, small)
    layers["cap_embedder.1"] = (int(c["cap_feat_dim"]), dim)
    if c.get("siglip_feat_dim"):
        layers["siglip_embedder.1"] = (int(c["siglip_feat_dim"]), dim)
        for i in range(int(c["n_refiner_layers"])):
            layers |= _block(f"siglip_refiner.{i}", dim, modulation=False)
    for i in range(int(c["n_layers"])):
        layers |= _block(f"layers.{i}", dim, modulation=True)
    return layers


def base_config_path(settings: Settings) -> Path | None:
    """The transformer config.json adapters are checked against, or None for Z-Image's published shape."""
    named = settings.adapter_base_config
    candidates = [Path(named)] if named else [Path(settings.turbo_model)]
    for path in candidates:
        if path.is_file():
            return path
        if (path / "transformer" / "config.json").is_file():
            return path / "transformer" / "config.json"
        if (path / "config.json").is_file():
            return path / "config.json"
    if named:
        raise ValueError(f"adapter_base_config {named!r} is neither a config.json nor a folder holding one")
    return None


@lru_cache(maxsize=8)
def _layers_of(path: str | None) -> dict[str, Shape]:
    config = json.loads(Path(path).read_text()) if path else {}
    return linear_layers(config)


def served_layers(settings: Settings) -> dict[str, Shape]:
    """The linear layers of the transformer this deployment serves (read once per config file)."""
    path = base_config_path(settings)
    return _layers_of(str(path) if path else None)
