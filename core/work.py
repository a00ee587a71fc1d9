"""How much work a request is: image tokens (what bounds a batch) and denoising steps (what progress counts).

Shared by the API (a job's cost at submit), the claim (a job's progress total) and the engine (batch planning,
the steps a call runs), so each rule is written once.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# Pixels per image token along each side: the VAE downsamples by 8 and the transformer patches 2x2 latents.
# Every Z-Image checkpoint has these; output sides must be multiples of it.
PIXELS_PER_TOKEN = 16


def image_tokens(width: int, height: int) -> int:
    """Image tokens (latent patches) of one ``width`` x ``height`` image."""
    return (width // PIXELS_PER_TOKEN) * (height // PIXELS_PER_TOKEN)


def denoising_steps(steps: int, strength: float) -> int:
    """How many steps img2img / inpaint run for ``steps`` and ``strength`` (diffusers' ``get_timesteps``)."""
    init_timestep = min(steps * strength, steps)
    return steps - int(max(steps - init_timestep, 0))


def progress_total(request: Mapping[str, Any]) -> int:
    """The denoising steps a job's progress counts to: its steps, or the share ``strength`` runs of them."""
    steps = int(request["steps"])
    if request.get("mode") in ("img2img", "inpaint"):
        return denoising_steps(steps, float(request.get("strength", 0.6)))
    return steps
