"""Load the Z-Image pipelines once per process and apply the operator options (placement, attention, compile):
Turbo, and Base sharing Turbo's text encoder, tokenizer and VAE objects when they match (``worker.engine.sharing``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

# The defining module, not `from diffusers import ...`: type checkers resolve the top-level name to a dummy.
from diffusers.pipelines.z_image.pipeline_z_image import ZImagePipeline

from worker.engine.options import EngineOptions
from worker.engine.sharing import SHAREABLE, reusable

log = logging.getLogger(__name__)


def apply_options(pipe: ZImagePipeline, options: EngineOptions) -> ZImagePipeline:
    """Place a loaded pipeline (or offload it) and apply the attention backend and compile options."""
    if options.cpu_offload:
        # Weights stay on the host; each model moves to the GPU when its forward runs.
        pipe.enable_model_cpu_offload(device=options.torch_device)
    else:
        pipe.to(options.torch_device)
    if options.attention_backend is not None:
        try:
            pipe.transformer.set_attention_backend(options.attention_backend)
        except Exception as exc:  # a missing package (flash-attn, sageattention, kernels) or a hub download
            raise ValueError(f"attention_backend {options.attention_backend!r} cannot be used here: {exc}") from exc
    if options.compile_transformer:
        # Regional compilation: the 30 identical blocks share one compiled graph, so it compiles in seconds
        # rather than minutes, with the speed of a whole-model compile (diffusers' compile_repeated_blocks).
        pipe.transformer.compile_repeated_blocks()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_turbo(model: str, options: EngineOptions) -> ZImagePipeline:
    """Load a Z-Image-Turbo pipeline (hub id or local folder) as ``options`` say, quietly."""
    # diffusers 0.42 deprecates `torch_dtype=` in favour of `dtype=`.
    pipe = ZImagePipeline.from_pretrained(model, dtype=options.torch_dtype)
    return apply_options(pipe, options)


def load_base(
    model: str, options: EngineOptions, share_from: ZImagePipeline | None = None
) -> tuple[ZImagePipeline, dict[str, bool]]:
    """Load Z-Image Base (hub id or folder) as ``options`` say, taking ``share_from``'s (Turbo's) text encoder and
    VAE objects instead of copies where the checkpoint's configs and sampled weights equal them, and its tokenizer
    with the text encoder when they tokenize alike. Returns the pipeline and which components are shared."""
    folder = Path(model) if Path(model).is_dir() else Path(ZImagePipeline.download(model))
    reuse: dict[str, Any] = {}
    if share_from is not None and options.cpu_offload:
        # Offload hooks belong to one pipeline: a module two pipelines offload would be moved by both.
        log.info("not sharing Turbo's components with Base: CPU offload is on")
    elif share_from is not None:
        dtype = options.torch_dtype
        reuse = reusable(share_from, folder, dict.fromkeys(SHAREABLE, dtype), what="base model")
    pipe = ZImagePipeline.from_pretrained(folder, dtype=options.torch_dtype, **reuse)
    if share_from is not None and "text_encoder" in reuse and _same_tokenizer(pipe.tokenizer, share_from.tokenizer):
        pipe.register_modules(tokenizer=share_from.tokenizer)
    shared = {
        name: share_from is not None and getattr(pipe, name) is getattr(share_from, name)
        for name in (*SHAREABLE, "tokenizer")
    }
    log.info("loaded base model %s; shared with Turbo: %s", model, shared)
    return apply_options(pipe, options), shared


def _same_tokenizer(a: Any, b: Any) -> bool:
    """Whether two tokenizers turn every prompt into the same tokens (vocabulary, merges' result, template)."""
    return bool(
        a.get_vocab() == b.get_vocab()
        and getattr(a, "chat_template", None) == getattr(b, "chat_template", None)
        and a.all_special_tokens == b.all_special_tokens
    )
