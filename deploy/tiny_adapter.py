"""Build LoRA adapters for tests, benchmarks and the demo, offline.

``build_tiny_adapter`` makes a real peft LoRA on the tiny checkpoint's transformer (``LoraConfig`` with
``init_lora_weights=False``, so B is not zero and the adapter changes the image) and saves it the way diffusers
does (``ZImagePipeline.save_lora_weights``: ``transformer.<module>.lora_A.weight`` / ``lora_B.weight``, with the
adapter's config in the file's metadata). ``random_lora`` makes the same layout from the shape table alone, for a
full-size transformer without building one.

Usage: ``python -m deploy.tiny_adapter OUT.safetensors [--base checkpoints/tiny/turbo] [--seed N] [--rank R]``.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

# Defining modules, not `from diffusers import ...`: type checkers resolve the top-level names to dummies.
from diffusers.models.transformers.transformer_z_image import ZImageTransformer2DModel
from diffusers.pipelines.z_image.pipeline_z_image import ZImagePipeline
from safetensors.torch import save_file

# Every attention and feed-forward projection of every block.
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "w1", "w2", "w3")


def build_tiny_adapter(
    base: str | Path, out: str | Path, *, seed: int = 0, rank: int = 4, targets: Iterable[str] = DEFAULT_TARGETS
) -> Path:
    """A peft LoRA of ``rank`` on ``base``'s transformer (a pipeline folder), saved to ``out`` (.safetensors)."""
    from peft import LoraConfig, get_peft_model_state_dict  # dev tooling: the worker loads adapters via diffusers

    transformer = ZImageTransformer2DModel.from_pretrained(Path(base) / "transformer")
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=list(targets), init_lora_weights=False)
    torch.manual_seed(seed)
    transformer.add_adapter(config)
    state = get_peft_model_state_dict(transformer)
    out = Path(out)
    with tempfile.TemporaryDirectory(dir=out.parent if out.parent.exists() else None) as tmp:
        ZImagePipeline.save_lora_weights(
            tmp, transformer_lora_layers=state, transformer_lora_adapter_metadata=config.to_dict()
        )
        (Path(tmp) / "pytorch_lora_weights.safetensors").replace(out)
    return out


def random_lora(
    layers: Mapping[str, tuple[int, int]],
    *,
    rank: int,
    seed: int = 0,
    targets: Iterable[str] = DEFAULT_TARGETS,
    dtype: torch.dtype = torch.bfloat16,
    std: float = 0.01,
) -> dict[str, torch.Tensor]:
    """A random LoRA state dict in diffusers' layout on every layer whose name ends with one of ``targets``
    (``layers``: ``core.adapter_shapes.linear_layers`` of the transformer's config)."""
    suffixes = tuple(f".{t}" for t in targets)
    generator = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for name, (fan_in, fan_out) in layers.items():
        if name.endswith(suffixes):
            a = torch.randn((rank, fan_in), generator=generator) * std
            b = torch.randn((fan_out, rank), generator=generator) * std
            state[f"transformer.{name}.lora_A.weight"] = a.to(dtype)
            state[f"transformer.{name}.lora_B.weight"] = b.to(dtype)
    return state


def save_lora(state: Mapping[str, torch.Tensor], out: str | Path) -> Path:
    """Write a LoRA state dict as a .safetensors file."""
    save_file({k: v.contiguous() for k, v in state.items()}, str(out))
    return Path(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--base", default="checkpoints/tiny/turbo")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rank", type=int, default=4)
    args = parser.parse_args()
    print(build_tiny_adapter(args.base, args.out, seed=args.seed, rank=args.rank))


if __name__ == "__main__":
    main()
