"""Loading a Stable Diffusion 1.x pipeline on the device and in the precision asked for."""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from genattr.devices import resolve_device
from genattr.errors import GenattrError

if TYPE_CHECKING:
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import (
        StableDiffusionPipeline,
    )

DTYPE_NAMES = ("auto", "float32", "float16", "bfloat16")
_ALIASES = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}


def prompt_ids(
    tokenizer: Any, prompts: Sequence[str], max_length: int | None = None
) -> torch.Tensor:
    """Token ids (N, max_length) of prompts, padded and truncated to the text encoder's length
    (the tokenizer's own unless given), as Stable Diffusion's training and sampling read them.
    The one tokenisation of training, the world's base training and the model-based methods."""
    return tokenizer(
        list(prompts),
        padding="max_length",
        max_length=tokenizer.model_max_length if max_length is None else max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """'auto' is float16 on a GPU (as the Custom Diffusion scripts run) and float32 elsewhere."""
    name = _ALIASES.get(dtype, dtype)
    if name not in DTYPE_NAMES:
        raise GenattrError(f"--dtype must be one of {', '.join(DTYPE_NAMES)}, not {dtype!r}")
    if name == "auto":
        name = "float16" if device.startswith("cuda") else "float32"
    return getattr(torch, name)


def import_genattr_components(base: str | os.PathLike) -> list[str]:
    """Import the genattr modules a local pipeline's `model_index.json` names (e.g. the world
    model's `genattr.world.vae`): diffusers loads components only from modules already
    imported, and these are ours, so importing them runs no foreign code."""
    index = Path(base) / "model_index.json"
    if not index.is_file():
        return []
    try:
        entries = json.loads(index.read_text())
    except (OSError, json.JSONDecodeError):
        return []
    names = sorted(
        {
            v[0]
            for v in entries.values()
            if isinstance(v, list) and v and isinstance(v[0], str) and v[0].startswith("genattr.")
        }
    )
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise GenattrError(f"{index}: cannot import component module {name} ({e})") from None
    return names


def load_base_pipeline(
    base: str | os.PathLike, device: str = "auto", dtype: str = "auto"
) -> StableDiffusionPipeline:
    """A Stable Diffusion 1.x pipeline from a Hugging Face id (your cache) or a local folder."""
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import (
        StableDiffusionPipeline,
    )

    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    import_genattr_components(base)
    try:  # diffusers renamed torch_dtype to dtype (0.36); the old name still works there
        from diffusers.utils.deprecation_utils import _resolve_dtype  # noqa: F401

        dtype_kw = {"dtype": torch_dtype}
    except ImportError:
        dtype_kw = {"torch_dtype": torch_dtype}
    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            str(base), **dtype_kw, safety_checker=None, requires_safety_checker=False
        )
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise GenattrError(f"cannot load the base model {str(base)!r}: {first}") from None
    pipe = pipe.to(dev)
    pipe.set_progress_bar_config(disable=True)
    return pipe
