"""Load the Z-Image Turbo pipeline once per process and apply the operator options (placement, attention, compile)."""

from __future__ import annotations

# The defining module, not `from diffusers import ...`: type checkers resolve the top-level name to a dummy.
from diffusers.pipelines.z_image.pipeline_z_image import ZImagePipeline

from worker.engine.options import EngineOptions


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
