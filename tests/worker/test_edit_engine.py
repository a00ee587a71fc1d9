"""The edit engine: each mode equals a direct diffusers call, shares Turbo's modules, batches where it can."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers.pipelines.z_image.pipeline_z_image import ZImagePipeline
from diffusers.pipelines.z_image.pipeline_z_image_img2img import ZImageImg2ImgPipeline
from diffusers.pipelines.z_image.pipeline_z_image_inpaint import ZImageInpaintPipeline
from diffusers.pipelines.z_image.pipeline_z_image_omni import ZImageOmniPipeline
from PIL import Image, ImageOps
from safetensors.torch import load_file, save_file

from core.errors import InvalidInput, OutOfMemory
from core.work import denoising_steps
from deploy.tiny_edit_checkpoint import is_current, main
from tests.helpers.engine import images_of
from worker.engine import BatchInterrupted, EditEngine, EditRequest, EngineOptions

TOLERANCE = 2  # max abs difference on uint8 pixels: 2/255
W, H = 128, 96


def picture(seed: int, size: tuple[int, int] = (W, H)) -> Image.Image:
    """A deterministic noise picture."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


def box_mask(size: tuple[int, int] = (W, H), box: tuple[int, int, int, int] = (32, 16, 96, 80)) -> Image.Image:
    """White (repaint) inside ``box``, black elsewhere."""
    mask = Image.new("L", size, 0)
    mask.paste(255, box)
    return mask


def diff(a: Image.Image, b: Image.Image) -> int:
    """Max abs pixel difference of two images."""
    return int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max())


def request(mode: str = "img2img", seeds: tuple[int, ...] = (0,), **overrides: Any) -> EditRequest:
    """A small request with test defaults."""
    fields: dict[str, Any] = {
        "prompt": "a red house by the sea",
        "images": (picture(1),),
        "mask": box_mask() if mode == "inpaint" else None,
        "width": W,
        "height": H,
        "steps": 4,
        "guidance_scale": 0.0,
        "strength": 0.6,
    }
    fields.update(overrides)
    return EditRequest(mode=mode, seeds=seeds, **fields)  # type: ignore[arg-type]


def quiet(pipe: Any) -> Any:
    """``pipe`` without its progress bar."""
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def turbo(tiny_turbo_dir: Path) -> ZImagePipeline:
    """The tiny Turbo in float32, loaded as the worker loads it on a CPU."""
    return quiet(ZImagePipeline.from_pretrained(tiny_turbo_dir, dtype=torch.float32))


@pytest.fixture(scope="module")
def engine(turbo: ZImagePipeline) -> EditEngine:
    """img2img and inpaint on the float32 Turbo; no edit model."""
    return EditEngine(turbo, edit_model=None, options=EngineOptions(device="cpu", dtype="float32"))


@pytest.fixture(scope="module")
def turbo_bf16(tiny_turbo_dir: Path) -> ZImagePipeline:
    """The tiny Turbo in bf16, as on a GPU: its VAE can serve Omni too."""
    return quiet(ZImagePipeline.from_pretrained(tiny_turbo_dir, dtype=torch.bfloat16))


@pytest.fixture(scope="module")
def omni_engine(turbo_bf16: ZImagePipeline, tiny_omni_dir: Path) -> EditEngine:
    """Every mode, with the tiny Omni as the edit model, on the bf16 Turbo."""
    return EditEngine(turbo_bf16, edit_model=str(tiny_omni_dir), options=EngineOptions(device="cpu", dtype="bfloat16"))


@pytest.fixture(scope="module")
def direct_omni(tiny_omni_dir: Path) -> ZImageOmniPipeline:
    """A plainly loaded Omni pipeline (its own copies of everything), bf16 as diffusers needs."""
    return quiet(ZImageOmniPipeline.from_pretrained(tiny_omni_dir, dtype=torch.bfloat16))


@pytest.fixture
def passes(turbo: ZImagePipeline) -> Iterator[list[int]]:
    """Counts forward passes of the float32 Turbo transformer during one test."""
    count = [0]
    handle = turbo.transformer.register_forward_hook(lambda *_: count.__setitem__(0, count[0] + 1))
    yield count
    handle.remove()


@pytest.fixture(scope="module")
def direct_img2img_pipe(tiny_turbo_dir: Path) -> ZImageImg2ImgPipeline:
    """A plainly loaded img2img pipeline on the Turbo weights (its own modules)."""
    return quiet(ZImageImg2ImgPipeline.from_pretrained(tiny_turbo_dir, dtype=torch.float32))


def direct_img2img(pipe: ZImageImg2ImgPipeline, req: EditRequest, seed: int) -> Image.Image:
    """The plain one-image diffusers call a user would write for this request and seed."""
    return pipe(
        prompt=req.prompt,
        image=req.images[0],
        strength=req.strength,
        width=req.width,
        height=req.height,
        num_inference_steps=req.steps,
        guidance_scale=req.guidance_scale,
        negative_prompt=req.negative_prompt,
        generator=torch.Generator("cpu").manual_seed(seed),
    ).images[0]


# --- sharing --------------------------------------------------------------------------------------------


def test_img2img_and_inpaint_run_on_turbos_own_modules(engine: EditEngine, turbo: ZImagePipeline) -> None:
    assert engine.modes == {"img2img", "inpaint"}
    for pipe in (engine.img2img, engine.inpaint):
        for name in ("transformer", "vae", "text_encoder", "tokenizer"):
            assert getattr(pipe, name) is getattr(turbo, name), name
        # The scheduler holds per-call state; each pipeline has its own, configured the same.
        assert pipe.scheduler is not turbo.scheduler
        assert dict(pipe.scheduler.config) == dict(turbo.scheduler.config)


def test_omni_shares_turbos_text_encoder_and_vae(omni_engine: EditEngine, turbo_bf16: ZImagePipeline) -> None:
    omni = omni_engine.omni
    assert omni is not None
    assert omni.text_encoder is turbo_bf16.text_encoder
    assert omni.vae is turbo_bf16.vae
    assert omni_engine.shared == {"text_encoder": True, "vae": True}
    assert omni.transformer is not turbo_bf16.transformer
    assert omni.transformer.config.siglip_feat_dim is not None


def test_float32_turbo_shares_the_text_encoder_but_not_the_vae(turbo: ZImagePipeline, tiny_omni_dir: Path) -> None:
    # ZImageOmniPipeline encodes condition images as bf16, so it needs a bf16 VAE: a float32 one is not shared.
    edit = EditEngine(turbo, edit_model=str(tiny_omni_dir), options=EngineOptions(device="cpu", dtype="float32"))
    assert edit.shared == {"text_encoder": True, "vae": False}
    assert edit.omni is not None and edit.omni.vae.dtype == torch.bfloat16
    out = edit.edit([request("instruct", steps=2)])
    assert out[0][0].size == (W, H)


def test_components_with_other_weights_or_configs_are_not_shared(
    turbo_bf16: ZImagePipeline, tiny_omni_dir: Path, tmp_path: Path
) -> None:
    other = tmp_path / "omni"
    shutil.copytree(tiny_omni_dir, other)
    weights = other / "text_encoder" / "model.safetensors"
    tensors = load_file(weights)
    tensors["embed_tokens.weight"] = tensors["embed_tokens.weight"] + 0.01  # a fine-tuned encoder, same config
    save_file(tensors, weights, metadata={"format": "pt"})
    config = json.loads((other / "vae" / "config.json").read_text())
    config["scaling_factor"] = 0.5  # another VAE
    (other / "vae" / "config.json").write_text(json.dumps(config))
    edit = EditEngine(turbo_bf16, edit_model=str(other), options=EngineOptions(device="cpu", dtype="bfloat16"))
    assert edit.shared == {"text_encoder": False, "vae": False}


def test_transformer_only_edit_release_takes_turbos_components(
    turbo_bf16: ZImagePipeline, turbo: ZImagePipeline, tiny_omni_dir: Path, tmp_path: Path
) -> None:
    bare = tmp_path / "omni"
    shutil.copytree(tiny_omni_dir, bare, ignore=shutil.ignore_patterns("text_encoder", "vae"))
    edit = EditEngine(turbo_bf16, edit_model=str(bare), options=EngineOptions(device="cpu", dtype="bfloat16"))
    assert edit.shared == {"text_encoder": True, "vae": True}
    with pytest.raises(ValueError, match="bfloat16"):
        EditEngine(turbo, edit_model=str(bare), options=EngineOptions(device="cpu", dtype="float32"))


def test_an_instruct_only_engine_needs_no_turbo(tiny_omni_dir: Path) -> None:
    edit = EditEngine(None, edit_model=str(tiny_omni_dir), options=EngineOptions(device="cpu", dtype="bfloat16"))
    assert edit.modes == {"instruct"}
    assert edit.shared == {"text_encoder": False, "vae": False}
    assert edit.edit([request("instruct", steps=1)])[0][0].size == (W, H)
    with pytest.raises(InvalidInput, match="Turbo"):
        edit.edit([request("img2img")])
    with pytest.raises(ValueError, match="needs"):
        EditEngine(None, edit_model=None)


# --- img2img --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "guidance", [{}, {"guidance_scale": 2.0, "negative_prompt": "blurry"}], ids=["no-cfg", "cfg-negative"]
)
def test_img2img_equals_a_direct_diffusers_call(
    engine: EditEngine, direct_img2img_pipe: ZImageImg2ImgPipeline, guidance: dict[str, Any]
) -> None:
    req = request("img2img", seeds=(21,), **guidance)
    [[image]] = engine.edit([req])
    assert image.size == (W, H)
    assert diff(image, direct_img2img(direct_img2img_pipe, req, 21)) <= TOLERANCE
    assert diff(image, req.images[0]) > 20  # it did edit


def test_img2img_fits_an_input_of_another_shape(engine: EditEngine, direct_img2img_pipe: ZImageImg2ImgPipeline) -> None:
    wide = picture(5, (300, 100))
    req = request("img2img", seeds=(3,), images=(wide,))
    [[image]] = engine.edit([req])
    assert image.size == (W, H)
    # Scaled to cover and centre-cropped, never stretched: the same as handing diffusers the fitted image.
    fitted = ImageOps.fit(wide, (W, H), method=Image.Resampling.LANCZOS)
    expected = direct_img2img(direct_img2img_pipe, request("img2img", images=(fitted,)), 3)
    assert diff(image, expected) <= TOLERANCE


def test_strength_sets_how_much_of_the_schedule_runs(engine: EditEngine, passes: list[int]) -> None:
    assert [denoising_steps(8, s) for s in (0.0, 0.05, 0.3, 0.5, 0.6, 1.0)] == [0, 1, 3, 4, 5, 8]
    low = engine.edit([request(seeds=(1,), strength=0.3, steps=4)])[0][0]
    assert passes[0] == denoising_steps(4, 0.3) == 2
    high = engine.edit([request(seeds=(1,), strength=1.0, steps=4)])[0][0]
    assert passes[0] == 2 + 4
    source = request().images[0]
    assert diff(low, source) < diff(high, source) or diff(low, high) > 20


def test_strength_zero_gives_the_input_back(engine: EditEngine, passes: list[int]) -> None:
    source = picture(9, (200, 150))
    [[a, b]] = engine.edit([request(seeds=(1, 2), strength=0.0, images=(source,))])
    fitted = ImageOps.fit(source, (W, H), method=Image.Resampling.LANCZOS)
    assert diff(a, fitted) == diff(b, fitted) == 0
    assert passes[0] == 0


def test_compatible_img2img_requests_run_as_one_call_equal_to_single_calls(
    engine: EditEngine, passes: list[int]
) -> None:
    batch = [
        request(seeds=(11, 12), prompt="a cat", images=(picture(1),)),
        request(seeds=(13,), prompt="一只猫坐在红色的垫子上", images=(picture(2),)),
        request(seeds=(14,), prompt="a dog", images=(picture(3),)),
    ]
    together = engine.edit(batch)
    assert passes[0] == denoising_steps(4, 0.6)  # one call for all four images
    assert [len(images) for images in together] == [2, 1, 1]
    for req, images in zip(batch, together, strict=True):
        for seed, image in zip(req.seeds, images, strict=True):
            [[alone]] = engine.edit([request(seeds=(seed,), prompt=req.prompt, images=req.images)])
            assert diff(image, alone) <= TOLERANCE
    assert diff(together[0][0], together[0][1]) > 20  # one generator per image


def test_incompatible_requests_are_split_and_keep_their_order(engine: EditEngine, passes: list[int]) -> None:
    batch = [
        request(seeds=(1,), strength=0.5),
        request("inpaint", seeds=(2,)),
        request(seeds=(3,), strength=1.0),
        request(seeds=(4,), strength=0.5),
    ]
    progress: list[tuple[int, ...]] = []
    results = engine.edit(batch, on_step=lambda steps: progress.append(tuple(steps)) is None and False)
    assert [len(images_of(r)) for r in results] == [1, 1, 1, 1]
    total = denoising_steps(4, 0.5) + denoising_steps(4, 0.6) + denoising_steps(4, 1.0)
    assert passes[0] == total  # three calls: (0.5 x2), inpaint, (1.0)
    # Each request counts its own steps (2, 3, 4 and 2), moving only while its own call runs.
    assert progress == [
        (1, 0, 0, 1), (2, 0, 0, 2),  # the two strength-0.5 requests together
        (2, 1, 0, 2), (2, 2, 0, 2), (2, 3, 0, 2),  # inpaint
        (2, 3, 1, 2), (2, 3, 2, 2), (2, 3, 3, 2), (2, 3, 4, 2),  # strength 1.0
    ]  # fmt: skip
    [[first]] = engine.edit([batch[0]])
    assert diff(results[0][0], first) <= TOLERANCE


# --- inpaint --------------------------------------------------------------------------------------------


def test_inpaint_equals_a_direct_diffusers_call(engine: EditEngine, tiny_turbo_dir: Path) -> None:
    req = request("inpaint", seeds=(5,))
    [[image]] = engine.edit([req])
    assert image.size == (W, H)
    pipe = quiet(ZImageInpaintPipeline.from_pretrained(tiny_turbo_dir, dtype=torch.float32))
    expected = pipe(
        prompt=req.prompt,
        image=req.images[0],
        mask_image=req.mask,
        strength=req.strength,
        width=W,
        height=H,
        num_inference_steps=req.steps,
        guidance_scale=0.0,
        generator=torch.Generator("cpu").manual_seed(5),
    ).images[0]
    assert diff(image, expected) <= TOLERANCE


def test_inpaint_depends_on_the_mask(engine: EditEngine) -> None:
    a = engine.edit([request("inpaint", seeds=(5,))])[0][0]
    b = engine.edit([request("inpaint", seeds=(5,), mask=box_mask(box=(0, 0, 40, 40)))])[0][0]
    assert diff(a, b) > 20


def test_inpaint_batches_with_per_image_masks(engine: EditEngine, passes: list[int]) -> None:
    first = request("inpaint", seeds=(1,), images=(picture(1),), mask=box_mask())
    second = request("inpaint", seeds=(2,), images=(picture(2),), mask=box_mask(box=(0, 0, 64, 48)))
    together = engine.edit([first, second])
    assert passes[0] == denoising_steps(4, 0.6)
    for req, [image] in zip((first, second), together, strict=True):
        assert diff(image, engine.edit([req])[0][0]) <= TOLERANCE


# --- instruct -------------------------------------------------------------------------------------------


def test_instruct_equals_a_direct_omni_call(omni_engine: EditEngine, direct_omni: ZImageOmniPipeline) -> None:
    images = (picture(1), picture(2, (96, 128)))
    req = request("instruct", seeds=(7, 8), images=images, prompt="make the sky red", steps=2)
    [outputs] = omni_engine.edit([req])
    assert [image.size for image in outputs] == [(W, H), (W, H)]
    for seed, image in zip(req.seeds, outputs, strict=True):
        expected = direct_omni(
            image=list(images),
            prompt="make the sky red",
            width=W,
            height=H,
            num_inference_steps=2,
            guidance_scale=0.0,
            generator=torch.Generator("cpu").manual_seed(seed),
        ).images[0]
        assert diff(image, expected) <= TOLERANCE
    assert diff(outputs[0], outputs[1]) > 20


def test_instruct_depends_on_its_condition_images(omni_engine: EditEngine) -> None:
    a = omni_engine.edit([request("instruct", seeds=(7,), images=(picture(1),), steps=2)])[0][0]
    b = omni_engine.edit([request("instruct", seeds=(7,), images=(picture(4),), steps=2)])[0][0]
    assert diff(a, b) > 20


def test_instruct_jobs_run_one_call_each(omni_engine: EditEngine) -> None:
    assert omni_engine.omni is not None
    calls = [0]
    original = omni_engine.omni.__class__.__call__

    def counting(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return original(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(omni_engine.omni.__class__, "__call__", counting)
        out = omni_engine.edit([request("instruct", seeds=(1, 2), steps=1), request("instruct", seeds=(3,), steps=1)])
    assert calls[0] == 2
    assert [len(images) for images in out] == [2, 1]


def test_instruct_takes_awkward_condition_images(omni_engine: EditEngine) -> None:
    tiny, sliver = picture(1, (8, 8)), picture(2, (1200, 20))
    [[image]] = omni_engine.edit([request("instruct", images=(tiny, sliver), steps=1)])
    assert image.size == (W, H)


# --- refusals and cancel --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "overrides", "message"),
    [
        ("instruct", {}, "edit model"),
        ("inpaint", {"mask": None}, "mask"),
        ("img2img", {"mask": box_mask()}, "mask"),
        ("img2img", {"images": (picture(1), picture(2))}, "exactly one"),
        ("img2img", {"strength": 1.5}, "strength"),
        ("img2img", {"width": 100}, "multiples"),
        ("img2img", {"seeds": ()}, "seed"),
        ("paint", {}, "mode"),
    ],
)
def test_unservable_requests_are_refused_before_any_call(
    engine: EditEngine, passes: list[int], mode: str, overrides: dict[str, Any], message: str
) -> None:
    bad = request(mode, **overrides)
    with pytest.raises(InvalidInput, match=message):
        engine.edit([request(), bad])
    assert passes[0] == 0


def test_too_many_condition_images_are_refused(omni_engine: EditEngine) -> None:
    with pytest.raises(InvalidInput, match="1 to 3"):
        omni_engine.edit([request("instruct", images=(picture(1),) * 4)])


def test_on_step_true_interrupts_the_batch(engine: EditEngine, passes: list[int]) -> None:
    batch = [request(seeds=(1,)), request(seeds=(2,), strength=1.0)]
    with pytest.raises(BatchInterrupted) as info:
        engine.edit(batch, on_step=lambda steps: steps[0] == 1)
    assert f"1/{denoising_steps(4, 0.6)}, 0/4" in info.value.message
    assert passes[0] == 1  # the rest of the call and the second call never ran


def test_instruct_can_be_interrupted(omni_engine: EditEngine) -> None:
    with pytest.raises(BatchInterrupted):
        omni_engine.edit([request("instruct", steps=3)], on_step=lambda steps: True)


def test_empty_batch(engine: EditEngine) -> None:
    assert engine.edit([]) == []


def test_warmup_runs_every_loaded_pipeline(omni_engine: EditEngine, turbo_bf16: ZImagePipeline) -> None:
    passes = [0]
    handles = [
        module.register_forward_hook(lambda *_: passes.__setitem__(0, passes[0] + 1))
        for module in (turbo_bf16.transformer, omni_engine.omni.transformer)  # type: ignore[union-attr]
    ]
    try:
        omni_engine.warmup()
    finally:
        for handle in handles:
            handle.remove()
    assert passes[0] == 2  # one img2img step on Turbo's transformer, one instruct step on Omni's


# --- the tiny Omni checkpoint and the engine's footprint -------------------------------------------------


def test_tiny_omni_checkpoint_pairs_with_the_tiny_turbo(tiny_omni_dir: Path, tiny_turbo_dir: Path) -> None:
    index = json.loads((tiny_omni_dir / "model_index.json").read_text())
    assert index["_class_name"] == "ZImageOmniPipeline"
    assert index["siglip"] == ["transformers", "Siglip2VisionModel"]
    assert index["siglip_processor"] == ["transformers", "Siglip2ImageProcessor"]
    transformer = json.loads((tiny_omni_dir / "transformer" / "config.json").read_text())
    siglip = json.loads((tiny_omni_dir / "siglip" / "config.json").read_text())
    assert transformer["siglip_feat_dim"] == siglip["hidden_size"]
    # Same text encoder and VAE, byte for byte, as the Turbo of the same seed: what makes sharing apply.
    for name in ("text_encoder/model.safetensors", "vae/diffusion_pytorch_model.safetensors"):
        assert (tiny_omni_dir / name).read_bytes() == (tiny_turbo_dir / name).read_bytes()
    assert is_current(tiny_omni_dir, seed=0) and not is_current(tiny_omni_dir, seed=1)


def test_tiny_omni_cli_reuses_a_current_build(tiny_omni_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = (tiny_omni_dir / "transformer" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    assert main([str(tiny_omni_dir), "--if-missing"]) == 0
    assert capsys.readouterr().out.strip() == str(tiny_omni_dir)
    assert (tiny_omni_dir / "transformer" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == before


def test_edit_engine_runs_without_the_service_packages() -> None:
    # A bare GPU host has only torch, diffusers and friends: simulate it by hiding the service packages.
    code = (
        "import sys\n"
        "for name in ['celery', 'kombu', 'redis', 'sqlalchemy', 'pydantic', 'pydantic_settings', 'boto3',\n"
        "             'botocore', 'fastapi', 'starlette', 'psycopg', 'api']:\n"
        "    sys.modules[name] = None\n"
        "import worker.engine.edit, deploy.tiny_edit_checkpoint\n"
        "assert {m for m in sys.modules if m.startswith('core')} <= {'core', 'core.errors', 'core.status',"
        " 'core.work'}\n"
    )
    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True, timeout=120)


# --- progress: one rule, each job on its own scale -------------------------------------------------------


def test_batched_instruct_jobs_each_count_to_their_own_steps(omni_engine: EditEngine) -> None:
    # Instruct jobs run one call each: job 2 waits at 0 while job 1 runs, and neither reads past 3 of 3.
    seen: list[tuple[int, ...]] = []
    batch = [request("instruct", steps=3, seeds=(1,)), request("instruct", steps=3, seeds=(2, 3))]
    omni_engine.edit(batch, on_step=lambda steps: seen.append(tuple(steps)) is None and False)
    assert seen == [(1, 0), (2, 0), (3, 0), (3, 1), (3, 2), (3, 3)]


def test_batched_img2img_counts_steps_times_strength(engine: EditEngine) -> None:
    seen: list[tuple[int, ...]] = []
    batch = [request(seeds=(1, 2), strength=0.6), request(seeds=(3,), strength=0.6)]
    engine.edit(batch, on_step=lambda steps: seen.append(tuple(steps)) is None and False)
    total = denoising_steps(4, 0.6)
    assert total == 3
    assert seen == [(step, step) for step in range(1, total + 1)]


# --- out of memory: split, fail only what cannot fit -----------------------------------------------------


@contextmanager
def oom_above(edit_engine: EditEngine, images: int | None) -> Iterator[None]:
    """Pipeline calls of more than ``images`` images raise out-of-memory while the block runs."""
    saved = edit_engine.options
    edit_engine.options = replace(saved, oom_above_images=images)
    try:
        yield
    finally:
        edit_engine.options = saved


def test_img2img_out_of_memory_splits_the_call_and_matches_single_calls(
    engine: EditEngine, passes: list[int]
) -> None:
    batch = [request(seeds=(11, 12), images=(picture(1),)), request(seeds=(13,), images=(picture(2),))]
    with oom_above(engine, 1):
        split = engine.edit(batch)
    assert passes[0] == 3 * denoising_steps(4, 0.6)  # three calls of one image each ran
    for req, result in zip(batch, split, strict=True):
        for seed, image in zip(req.seeds, images_of(result), strict=True):
            [[alone]] = engine.edit([request(seeds=(seed,), images=req.images)])
            assert diff(image, alone) <= TOLERANCE


def test_img2img_that_cannot_fit_fails_with_out_of_memory_and_the_engine_goes_on(engine: EditEngine) -> None:
    with oom_above(engine, 0):
        results = engine.edit([request(seeds=(1, 2)), request("inpaint", seeds=(3,))])
    assert all(isinstance(r, OutOfMemory) for r in results)
    assert "out of memory" in results[0].message and f"{W}x{H} img2img" in results[0].message  # type: ignore[union-attr]
    assert len(images_of(engine.edit([request(seeds=(1,))])[0])) == 1


def test_instruct_out_of_memory_splits_its_images_and_fails_only_what_cannot_fit(omni_engine: EditEngine) -> None:
    batch = [request("instruct", steps=2, seeds=(1, 2)), request("instruct", steps=2, seeds=(3,))]
    whole = omni_engine.edit(batch)
    with oom_above(omni_engine, 1):
        split = omni_engine.edit(batch)
    for a, b in zip(whole, split, strict=True):
        for x, y in zip(images_of(a), images_of(b), strict=True):
            assert diff(x, y) <= TOLERANCE
    with oom_above(omni_engine, 0):
        failed = omni_engine.edit(batch)
    assert all(isinstance(r, OutOfMemory) for r in failed)
    assert "instruct" in failed[1].message  # type: ignore[union-attr]
