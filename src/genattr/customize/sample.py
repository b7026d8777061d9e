"""Sampling a customized model: images `00000.png`... (prompt i -> images k*i .. k*i+k-1, k
images per prompt, as in the authors' release), each reproducible on its own.

Every image gets its own seed (`seed + image index`) and its own generator, so an image does
not depend on what else was in its batch. The scheduler, steps, guidance scale, eta, seed and
prompt are written into each PNG (text chunk `genattr`) and, for the whole folder, into
`generation.json` beside the images.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import torch
from PIL.PngImagePlugin import PngInfo
from pydantic import Field

from genattr.atomic import atomic_path, write_text_atomic
from genattr.customize.config import INFO_NAME
from genattr.customize.loading import load_custom_diffusion
from genattr.customize.pipeline import load_base_pipeline
from genattr.errors import GenattrError
from genattr.options import options_from_mapping

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import (
        StableDiffusionPipeline,
    )

GENERATION_FORMAT_VERSION = 1
INDEX_NAME = "generation.json"
SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "pndm": "PNDMScheduler",
    "dpm": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler-a": "EulerAncestralDiscreteScheduler",
}


@dataclass
class SampleConfig:
    """Defaults from Custom Diffusion's inference example (DDIM-style, 100 steps, guidance 6,
    eta 1); `images_per_prompt` 4 as the authors."""

    scheduler: str = "ddim"
    steps: Annotated[int, Field(ge=1)] = 100
    guidance_scale: Annotated[float, Field(ge=0)] = 6.0
    eta: Annotated[float, Field(ge=0, le=1)] = 1.0
    seed: int = 0
    images_per_prompt: Annotated[int, Field(ge=1)] = 4
    height: Annotated[int, Field(ge=8)] | None = None
    width: Annotated[int, Field(ge=8)] | None = None

    def check(self) -> None:
        if self.scheduler not in SCHEDULERS and self.scheduler != "default":
            raise GenattrError(
                f"scheduler must be one of {', '.join([*SCHEDULERS, 'default'])}, "
                f"not {self.scheduler!r}"
            )
        if self.steps < 1 or self.images_per_prompt < 1:
            raise GenattrError("steps and images per prompt must be at least 1")


def sample_config_from_dict(values: dict[str, Any] | None) -> SampleConfig:
    """A config from a plan's `sample:` mapping; unknown keys and ill-typed values are errors."""
    cfg = options_from_mapping(SampleConfig, values, "sampling")
    cfg.check()
    return cfg


def set_scheduler(pipe: StableDiffusionPipeline, name: str) -> str:
    """Swap in the named scheduler (configured from the pipeline's own); returns its class."""
    import diffusers

    if name != "default":
        cls = getattr(diffusers, SCHEDULERS[name])
        pipe.scheduler = cls.from_config(pipe.scheduler.config)
    return type(pipe.scheduler).__name__


@dataclass
class SampleStats:
    images: int
    seconds: float

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else float("inf")


def render(
    pipe: StableDiffusionPipeline, prompt: str, seeds: Sequence[int], config: SampleConfig
) -> list[Any]:
    """One PIL image of `prompt` per seed, each from its own generator, under the pipeline's
    current scheduler and the config's steps, guidance and eta."""
    gens = [torch.Generator(device=pipe.unet.device).manual_seed(s) for s in seeds]
    with torch.inference_mode():
        return pipe(
            prompt,
            num_images_per_prompt=len(seeds),
            generator=gens,
            num_inference_steps=config.steps,
            guidance_scale=config.guidance_scale,
            eta=config.eta,
            height=config.height,
            width=config.width,
        ).images


def generate_images(
    pipe: StableDiffusionPipeline,
    prompts: Sequence[str],
    out_dir: str | os.PathLike,
    config: SampleConfig | None = None,
    record: dict[str, Any] | None = None,
) -> tuple[list[Path], SampleStats]:
    """Sample `images_per_prompt` images for each prompt into `out_dir`; returns their paths."""
    cfg = config or SampleConfig()
    cfg.check()
    if not prompts:
        raise GenattrError("no prompts to sample")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    original = pipe.scheduler
    scheduler_class = set_scheduler(pipe, cfg.scheduler)
    k = cfg.images_per_prompt
    settings = {
        "scheduler": scheduler_class,
        "steps": cfg.steps,
        "guidance_scale": cfg.guidance_scale,
        "eta": cfg.eta,
        "height": cfg.height,
        "width": cfg.width,
        "dtype": str(pipe.unet.dtype).removeprefix("torch."),
    }
    entries: list[dict[str, Any]] = []
    paths: list[Path] = []
    t0 = time.perf_counter()
    try:
        for i, prompt in enumerate(prompts):
            seeds = [cfg.seed + i * k + j for j in range(k)]
            images = render(pipe, prompt, seeds, cfg)
            for j, (image, seed) in enumerate(zip(images, seeds, strict=True)):
                name = f"{i * k + j:05d}.png"
                entry = {"file": name, "prompt": prompt, "prompt_index": i, "seed": seed}
                info = PngInfo()
                info.add_text("genattr", json.dumps({**entry, **settings, **(record or {})}))
                with atomic_path(out / name) as tmp:
                    image.save(tmp, format="PNG", pnginfo=info)
                    os.chmod(tmp, 0o644)
                entries.append(entry)
                paths.append(out / name)
            logger.info("  prompt %d/%d: %s", i + 1, len(prompts), prompt)
    finally:
        pipe.scheduler = original
    stats = SampleStats(len(paths), time.perf_counter() - t0)
    index = {
        "kind": "genattr.generation",
        "format_version": GENERATION_FORMAT_VERSION,
        **(record or {}),
        "images_per_prompt": k,
        "seed": cfg.seed,
        **settings,
        "prompts": list(prompts),
        "images": entries,
    }
    write_text_atomic(out / INDEX_NAME, json.dumps(index, indent=1))
    return paths, stats


def generate(
    model_dir: str | os.PathLike,
    prompts: Sequence[str],
    out_dir: str | os.PathLike,
    config: SampleConfig | None = None,
    *,
    base: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
) -> tuple[list[Path], SampleStats]:
    """Load the base model, install the Custom Diffusion model (checked), sample the prompts.

    Args:
        model_dir: a customized model's folder (`genattr customize`).
        prompts: sentences, each sampled `config.images_per_prompt` times.
        out_dir: where 00000.png ... and generation.json go.
        config: the sampling options (default `SampleConfig()`).
        base: the base model (default: the one the model records).
        device, dtype: auto, or as `load_base_pipeline` takes them.
    """
    info = read_model_info(model_dir)
    base = base or info.get("base")
    if not base:
        raise GenattrError(
            f"{model_dir}: the base model is not recorded (not made by genattr); give --base"
        )
    cfg = config or SampleConfig()
    cfg.check()
    pipe = load_base_pipeline(base, device, dtype)
    report = load_custom_diffusion(pipe, model_dir)
    record = {"model": str(model_dir), "base": str(base), "tokens": report.tokens}
    return generate_images(pipe, prompts, out_dir, cfg, record=record)


def read_model_info(model_dir: str | os.PathLike) -> dict[str, Any]:
    """genattr's record of a customized model ({} for models made elsewhere)."""
    p = Path(model_dir) / INFO_NAME
    if not p.is_file():
        return {}
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise GenattrError(f"{p}: not valid JSON ({e})") from None
