"""Components two pipelines can hold as one object: a checkpoint's text encoder or VAE that equals one already
loaded (same config, a sample of the same weights, the dtype its pipeline needs) is taken from the loaded
pipeline instead of being loaded again, so it sits in memory once.

Turbo and Base ship the same Qwen3 text encoder and the same VAE; the Omni / Edit checkpoint does too (its VAE
must be bf16). A folder without the component (a transformer-only release) takes the loaded one outright.
"""

from __future__ import annotations

import inspect
import json
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

log = logging.getLogger(__name__)

SHAREABLE = ("text_encoder", "vae")  # what a second checkpoint may take from the loaded pipeline
# Config keys that differ between two saves of the same weights.
_VOLATILE_CONFIG_KEYS = {"architectures", "dtype", "torch_dtype", "transformers_version"}
_WEIGHT_SAMPLES = 3  # tensors compared per component before sharing it
_SAMPLE_ROWS = 4  # leading rows of each sampled tensor that are compared


def reusable(
    loaded: Any, folder: Path, needs: Mapping[str, torch.dtype], *, what: str, owner: str = "Turbo"
) -> dict[str, Any]:
    """The components of the ``loaded`` pipeline the checkpoint in ``folder`` can use as they are, by name.

    ``needs``: each shareable component's name and the dtype the new pipeline needs it in. ``what`` names the new
    model and ``owner`` the loaded one, in log lines and errors."""
    reuse: dict[str, Any] = {}
    for name, needed in needs.items():
        module = getattr(loaded, name)
        if not (folder / name).is_dir():
            # A transformer-only release relies on the base model's component: the loaded one is the one there is.
            if module.dtype != needed:
                raise ValueError(
                    f"the {what} has no {name} and {owner}'s is {module.dtype}; the {what} pipeline needs"
                    f" {needed}: run the worker with ZIMAGE_DTYPE=bfloat16"
                )
            log.info("%s has no %s: using %s's", what, name, owner)
            reuse[name] = module
        elif module.dtype != needed:
            log.info("not sharing %s: %s's is %s, the %s pipeline needs %s", name, owner, module.dtype, what, needed)
        elif not same_config(module, folder / name):
            log.info("not sharing %s: its config differs from %s's", name, owner)
        elif not same_weights(module, folder / name):
            log.info("not sharing %s: its weights differ from %s's", name, owner)
        else:
            reuse[name] = module
    return reuse


def parameter_bytes(modules: Iterable[torch.nn.Module]) -> int:
    """Bytes of the parameters and buffers of ``modules``, each tensor counted once however many modules (or
    pipelines) hold it: what they occupy together."""
    seen: set[int] = set()
    total = 0
    for module in modules:
        for tensor in [*module.parameters(), *module.buffers()]:
            storage = tensor.untyped_storage()
            if storage.data_ptr() in seen:
                continue
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def same_config(module: Any, folder: Path) -> bool:
    """True when the config saved in ``folder`` describes the same model as ``module``'s config."""
    if hasattr(module.config, "to_dict"):  # a transformers PreTrainedModel
        other = type(module.config).from_pretrained(folder).to_dict()
        mine = module.config.to_dict()
    else:  # a diffusers ModelMixin: fill defaults so an older save with fewer keys still compares equal
        cls = type(module)
        other = _init_config(cls, cls.load_config(folder))
        mine = _init_config(cls, dict(module.config))
    return _canonical(mine) == _canonical(other)


def same_weights(module: torch.nn.Module, folder: Path) -> bool:
    """True when a sample of the tensors saved in ``folder`` equals ``module``'s (a cheap fingerprint)."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return False
    state = module.state_dict()
    compared = 0
    with safe_open(str(files[0]), framework="pt") as saved:
        names = sorted(saved.keys())
        picks = dict.fromkeys([names[0], names[len(names) // 2], names[-1]][:_WEIGHT_SAMPLES])
        for name in picks:
            key = name if name in state else name.removeprefix("model.")
            if key not in state:
                continue
            mine = state[key].detach()
            sliced = saved.get_slice(name)
            if len(sliced.get_shape()) == 0:
                theirs = saved.get_tensor(name)
            else:
                rows = min(_SAMPLE_ROWS, sliced.get_shape()[0])
                theirs, mine = sliced[:rows], mine[:rows]
            if not torch.equal(theirs.to(mine.dtype), mine.cpu()):
                return False
            compared += 1
    return compared > 0


def _init_config(cls: type, config: dict[str, Any]) -> dict[str, Any]:
    """The constructor arguments a diffusers config stands for: saved values over the signature defaults."""
    params = inspect.signature(cls.__init__).parameters  # type: ignore[misc]
    values = {
        name: p.default for name, p in params.items() if name != "self" and p.default is not inspect.Parameter.empty
    }
    values.update({k: v for k, v in config.items() if k in params})
    return values


def _canonical(config: dict[str, Any]) -> str:
    """A config as comparable JSON: tuples as lists, private and volatile keys dropped."""
    kept = {k: v for k, v in config.items() if not k.startswith("_") and k not in _VOLATILE_CONFIG_KEYS}
    return json.dumps(kept, sort_keys=True, default=str)
