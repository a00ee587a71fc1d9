"""LoRA adapter files, checked without running anything: a ``.safetensors`` header parsed and checked as the bytes
arrive, against the served transformer's linear layers (``core.adapter_shapes``). No torch, no numpy.

The format: 8 bytes, a little-endian u64 N; N bytes of JSON, ``{name: {"dtype", "shape", "data_offsets": [begin,
end]}, "__metadata__": {str: str}}``; then the tensors' bytes, back to back. What is accepted:

- dtypes F16, BF16 and F32; each tensor's bytes exactly its shape's; the tensors contiguous from offset 0, no gap,
  no overlap; the file exactly 8 + N + the data's size (known only at the end of the stream);
- LoRA names that map onto a module of the served transformer, in one of the two layouts diffusers 0.42.1 loads
  for Z-Image: ``transformer.<module>.lora_A.weight`` / ``.lora_B.weight`` (diffusers' own), or
  ``diffusion_model.<module>.lora_down.weight`` / ``.lora_up.weight`` (or ``lora_A`` / ``lora_B``) with an
  optional scalar ``diffusion_model.<module>.alpha`` (``ZImageLoraLoaderMixin`` converts these itself);
- each module with both halves, A ``[r, in_features]`` and B ``[out_features, r]`` of its layer, one rank per
  module, 1 ≤ r ≤ the rank limit; at least one module.

A file that is not a safetensors file at all (a pickle, a ZIP such as ``torch.save``'s, a header length that makes
no sense, a header that is not a JSON object) is ``UnsupportedMediaType``; a safetensors file that breaks a rule is
``ValidationFailed`` naming the first bad tensor.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NoReturn

from core.errors import UnsupportedMediaType, ValidationFailed

PREFIX_BYTES = 8
MAX_HEADER_BYTES = 16 << 20
ITEMSIZE = {"F16": 2, "BF16": 2, "F32": 4}
ONLY_SAFETENSORS = "only .safetensors adapters are accepted"
METADATA = "__metadata__"

_PICKLE = 0x80  # every pickle of protocol 2 and later starts with PROTO (torch.save's legacy format too)
_ZIP = b"PK\x03\x04"  # torch.save's default format since 1.6: a ZIP archive holding a pickle
# The two layouts diffusers loads for Z-Image, and what each half is called in them.
_DIFFUSERS = re.compile(r"transformer\.(?P<module>.+)\.(?P<half>lora_A|lora_B)\.weight")
_ORIGINAL = re.compile(r"diffusion_model\.(?P<module>.+)\.(?:(?P<half>lora_A|lora_B|lora_down|lora_up)\.weight|alpha)")
_HALF = {"lora_A": "A", "lora_down": "A", "lora_B": "B", "lora_up": "B"}
_LAYOUTS = (
    "transformer.<module>.lora_A.weight / lora_B.weight, or diffusion_model.<module>.lora_down.weight / "
    "lora_up.weight (or lora_A / lora_B) with an optional diffusion_model.<module>.alpha"
)


@dataclass(frozen=True)
class LoraFile:
    """What a checked adapter file holds."""

    rank: int  # the largest rank of its modules
    target_modules: list[str]  # the transformer modules it adapts, sorted
    tensors: int
    size: int  # the whole file's bytes: 8 + header + data


@dataclass
class _Module:
    """The tensors of one adapted module, by half ("A", "B", "alpha"): (tensor name, shape)."""

    halves: dict[str, tuple[str, list[int]]] = field(default_factory=dict)


class LoraChecker:
    """Feed a file's bytes as they arrive; the header is checked as soon as it is complete (``header_checked``),
    before the caller stores anything, and ``finish`` checks the file's length at the end.

    Memory: the header (at most 16 MiB) until it is checked; nothing of the tensors' data.
    """

    def __init__(self, layers: Mapping[str, tuple[int, int]], *, max_rank: int, field: str = "file") -> None:
        self.layers = layers
        self.max_rank = max_rank
        self.field = field
        self.received = 0
        self._head = bytearray()  # the 8-byte length and the header, until the header is checked
        self._length: int | None = None
        self._summary: LoraFile | None = None
        self._last_tensor = ""  # the tensor whose data ends the file
        self._spans: list[tuple[int, int, str]] = []  # (begin, end, name) of each tensor, in offset order

    @property
    def header_checked(self) -> bool:
        """True once the whole header arrived and passed every check."""
        return self._summary is not None

    @property
    def expected_size(self) -> int | None:
        """The file's size as its header says (8 + header + data), once the header is checked."""
        return self._summary.size if self._summary is not None else None

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """The next bytes of the file; raises the refusal as soon as the bytes so far show one."""
        view = memoryview(data)
        self.received += len(view)
        while view and self._summary is None:
            wanted = (PREFIX_BYTES if self._length is None else PREFIX_BYTES + self._length) - len(self._head)
            taken = view[:wanted]
            self._head += taken
            view = view[len(taken) :]
            self._sniff()
            if self._length is not None and len(self._head) == PREFIX_BYTES + self._length:
                self._summary = self._check_header(bytes(self._head[PREFIX_BYTES:]))
                self._head = bytearray()
        if self._summary is not None and self.received > self._summary.size:
            extra = self.received - self._summary.size
            self._refuse(self._last_tensor, f"the file goes on past its last tensor's data ({extra}+ bytes more)")

    def finish(self) -> LoraFile:
        """The file's summary once every byte was fed; refuses a file shorter (or longer) than its header says."""
        if self._summary is None:
            if self._length is None:
                raise self._not_safetensors(f"it is {self.received} bytes, too short for a safetensors header")
            raise self._not_safetensors(
                f"its first 8 bytes give a header of {self._length} bytes, but the file ends after "
                f"{self.received - PREFIX_BYTES} of them"
            )
        if self.received != self._summary.size:
            data_end = self.received - PREFIX_BYTES - (self._length or 0)
            cut = next((name for begin, end, name in self._spans if end > data_end), self._last_tensor)
            self._refuse(
                cut,
                f"the file ends after {self.received} bytes but its header needs {self._summary.size}: "
                "the data is cut short",
            )
        return self._summary

    # --- what the bytes are -------------------------------------------------------------------------------

    def _sniff(self) -> None:
        """Refuse what is plainly not a safetensors file from its first bytes, without waiting for the rest."""
        head = self._head
        if head[:1] == bytes([_PICKLE]):
            raise self._not_safetensors("it is a pickle (a PyTorch .pt / .bin / .ckpt file)")
        if len(head) >= len(_ZIP) and head[: len(_ZIP)] == _ZIP:
            raise self._not_safetensors("it is a ZIP archive (a PyTorch .pt / .bin / .ckpt file saved by torch.save)")
        if self._length is None and len(head) == PREFIX_BYTES:
            length = int.from_bytes(head, "little")
            if length > MAX_HEADER_BYTES:
                raise self._not_safetensors(
                    f"its first 8 bytes give a header of {length} bytes (a safetensors header is at most 16 MiB here)"
                )
            if length < 2:
                raise self._not_safetensors(f"its first 8 bytes give a header of {length} bytes")
            self._length = length
        if len(head) > PREFIX_BYTES and head[PREFIX_BYTES] != ord("{"):
            raise self._not_safetensors("its header does not start with '{'")

    def _check_header(self, raw: bytes) -> LoraFile:
        try:
            header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
        except _Duplicate as exc:
            message = f"the header names '{_cut(exc.key)}' twice"
            raise ValidationFailed(message, [{"field": self.field, "message": message}]) from None
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise self._not_safetensors("its header is not JSON") from None
        if not isinstance(header, dict):
            raise self._not_safetensors("its header is not a JSON object")
        metadata = header.pop(METADATA, None)
        if metadata is not None:
            self._check_metadata(metadata)
        entries: list[tuple[str, str, list[int], int, int]] = []
        for name, entry in header.items():
            entries.append((name, *self._check_entry(name, entry)))
        self._spans = self._check_layout(entries)
        modules = self._modules(entries)
        ranks = {module: self._check_module(module, parts) for module, parts in modules.items()}
        if not ranks:
            raise ValidationFailed(
                "the file holds no LoRA weights",
                [{"field": self.field, "message": f"no LoRA weights: expected {_LAYOUTS}"}],
            )
        data = self._spans[-1][1] if self._spans else 0
        self._last_tensor = self._spans[-1][2] if self._spans else ""
        return LoraFile(
            rank=max(ranks.values()),
            target_modules=sorted(ranks),
            tensors=len(entries),
            size=PREFIX_BYTES + len(raw) + data,
        )

    def _check_metadata(self, metadata: Any) -> None:
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            self._refuse_metadata("must map names to strings")
        config = metadata.get("lora_adapter_metadata")
        if config is None:
            return
        try:
            parsed = json.loads(config)
        except (ValueError, RecursionError):
            parsed = None
        if not isinstance(parsed, dict):
            self._refuse_metadata("lora_adapter_metadata is not a JSON object")
        if any(parsed.get(k) for k in ("use_dora", "transformer.use_dora")):
            self._refuse_metadata("lora_adapter_metadata asks for DoRA, which is not supported")

    # --- each tensor --------------------------------------------------------------------------------------

    def _check_entry(self, name: str, entry: Any) -> tuple[str, list[int], int, int]:
        """(dtype, shape, begin, end) of one tensor, its own rules checked."""
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            self._refuse(name, "must have exactly dtype, shape and data_offsets")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in ITEMSIZE:
            self._refuse(name, f"has dtype {_show(dtype)}; only {', '.join(ITEMSIZE)} are accepted")
        if not isinstance(shape, list) or len(shape) > 8 or not all(_is_count(d) for d in shape):
            self._refuse(name, f"has shape {_show(shape)}, not a list of sizes")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
            self._refuse(name, f"has data_offsets {_show(offsets)}, not [begin, end]")
        begin, end = offsets
        needed = math.prod(shape) * ITEMSIZE[dtype]
        if end - begin != needed:
            self._refuse(
                name, f"has data_offsets [{begin}, {end}] ({end - begin} bytes), but {dtype} {shape} needs {needed}"
            )
        return dtype, shape, begin, end

    def _check_layout(self, entries: list[tuple[str, str, list[int], int, int]]) -> list[tuple[int, int, str]]:
        """The tensors in offset order, checked to follow each other from 0 with no gap and no overlap."""
        spans = sorted((begin, end, name) for name, _, _, begin, end in entries)
        expected = 0
        for begin, end, name in spans:
            if begin > expected:
                self._refuse(name, f"starts at data offset {begin}, leaving a gap after {expected}")
            if begin < expected:
                self._refuse(
                    name, f"starts at data offset {begin}, overlapping the tensor before it (ends at {expected})"
                )
            expected = end
        return spans

    def _modules(self, entries: list[tuple[str, str, list[int], int, int]]) -> dict[str, _Module]:
        """The tensors grouped by the module they adapt, every name checked to be a LoRA weight of one."""
        modules: dict[str, _Module] = {}
        naming: str | None = None  # the first weight's layout: every other weight must share it
        alpha: str | None = None  # the first alpha (only the diffusion_model.* layout has them)
        for name, _, shape, _, _ in entries:
            module, half, layout = self._parse_name(name)
            if half == "alpha":
                alpha = alpha or name
            elif naming is None:
                naming = layout
            elif layout != naming:
                self._refuse(name, f"mixes naming layouts ({layout} after {naming})")
            parts = modules.setdefault(module, _Module())
            if half in parts.halves:
                self._refuse(name, f"is a second {half} weight of module '{module}'")
            parts.halves[half] = (name, shape)
        if alpha is not None and naming is not None and not naming.startswith("diffusion_model."):
            self._refuse(alpha, f"is an alpha in a {naming} file (only the diffusion_model.* layout has them)")
        return modules

    def _parse_name(self, name: str) -> tuple[str, str, str]:
        """(module, half, naming) of a tensor name; refuses anything but a LoRA weight of a served module."""
        if "dora_scale" in name or name.endswith(".magnitude"):
            self._refuse(name, "is a DoRA weight; DoRA adapters are not supported")
        if ".lokr_" in name or ".hada_" in name:
            self._refuse(name, "is a LoKr / LoHa weight; only LoRA adapters are accepted")
        if name.startswith(("lora_unet_", "lora_te", "text_encoder", "te.", "te1.", "te2.")):
            if name.startswith("lora_unet_"):
                self._refuse(name, f"uses kohya-style 'lora_unet_' names; use {_LAYOUTS}")
            self._refuse(name, "is a text-encoder weight; adapters apply to the transformer only")
        match = _DIFFUSERS.fullmatch(name) or _ORIGINAL.fullmatch(name)
        if match is None:
            self._refuse(name, f"is not a LoRA weight name; expected {_LAYOUTS}")
        module = match["module"]
        if module not in self.layers:
            self._refuse(name, f"names module '{module}', which the served transformer does not have")
        if name.startswith("transformer."):
            return module, _HALF[match["half"]], "transformer.*.lora_A/B"
        if match["half"] is None:
            return module, "alpha", "diffusion_model.*.alpha"
        style = "lora_A/B" if match["half"] in ("lora_A", "lora_B") else "lora_down/up"
        return module, _HALF[match["half"]], f"diffusion_model.*.{style}"

    def _check_module(self, module: str, parts: _Module) -> int:
        """The rank of one module's pair, its shapes checked against the layer."""
        fan_in, fan_out = self.layers[module]
        halves = parts.halves
        if "A" not in halves or "B" not in halves:
            have = halves.get("A") or halves.get("B") or halves["alpha"]
            missing = "down (A)" if "A" not in halves else "up (B)"
            self._refuse(have[0], f"has no matching {missing} weight for module '{module}'")
        (a_name, a_shape), (b_name, b_shape) = halves["A"], halves["B"]
        if len(a_shape) != 2 or a_shape[1] != fan_in:
            self._refuse(a_name, f"has shape {a_shape}; module '{module}' needs [rank, {fan_in}]")
        if len(b_shape) != 2 or b_shape[0] != fan_out:
            self._refuse(b_name, f"has shape {b_shape}; module '{module}' needs [{fan_out}, rank]")
        rank = a_shape[0]
        if b_shape[1] != rank:
            self._refuse(b_name, f"has rank {b_shape[1]} but its A weight ({a_name}) has rank {rank}")
        if not 1 <= rank <= self.max_rank:
            self._refuse(a_name, f"has rank {rank}; the limit is 1 to {self.max_rank}")
        if "alpha" in halves and halves["alpha"][1] not in ([], [1]):
            self._refuse(halves["alpha"][0], f"has shape {halves['alpha'][1]}; an alpha is one number")
        return rank

    # --- refusals ---------------------------------------------------------------------------------------

    def _refuse(self, tensor: str, problem: str) -> NoReturn:
        message = f"tensor '{_cut(tensor)}' {problem}"
        raise ValidationFailed(message, [{"field": self.field, "message": message}])

    def _refuse_metadata(self, problem: str) -> NoReturn:
        message = f"{METADATA} {problem}"
        raise ValidationFailed(message, [{"field": self.field, "message": message}])

    def _not_safetensors(self, why: str) -> UnsupportedMediaType:
        message = f"not a .safetensors file: {why}; {ONLY_SAFETENSORS}"
        return UnsupportedMediaType(message, [{"field": self.field, "message": message}])


def check_lora(data: bytes, layers: Mapping[str, tuple[int, int]], *, max_rank: int, field: str = "file") -> LoraFile:
    """Check a whole adapter file in memory (what ``LoraChecker`` does for a stream)."""
    checker = LoraChecker(layers, max_rank=max_rank, field=field)
    checker.feed(data)
    return checker.finish()


class _Duplicate(Exception):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object that names no key twice (json.loads would keep the last one silently)."""
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _Duplicate(key)
        result[key] = value
    return result


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 62


def _cut(name: str, limit: int = 200) -> str:
    """A tensor name in a message, cut short (a hostile header may hold very long ones)."""
    return name if len(name) <= limit else name[: limit - 3] + "..."


def _show(value: Any) -> str:
    """A JSON value in a message, cut short."""
    text = json.dumps(value, ensure_ascii=True)
    return text if len(text) <= 60 else text[:57] + "..."
