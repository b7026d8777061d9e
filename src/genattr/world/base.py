"""The miniature world's base text-to-image model, trained here from scratch on CPU.

A pixel-space diffusers `UNet2DConditionModel` with cross-attention, conditioned on a small
`CLIPTextModel` (built from a config) through the world's word-level CLIP tokenizer. It is
wrapped as a `StableDiffusionPipeline` whose VAE is the identity (`IdentityVAE`, scale factor
1, scaling factor 1, `genattr.world.vae`), so everything that works on Stable Diffusion,
`genattr.customize` included, works on it unchanged.

Training is resumable: a checkpoint (weights, EMA, optimizer, step, every random state) is
written every `checkpoint_seconds` (and every `checkpoint_every` steps if set) into
`checkpoints/step-NNNNNNN/`, atomically; a run restarts from the newest complete one, so a
killed run loses at most one interval, and the resumed run is the same, step for step, as one
that was never stopped. Each checkpoint gets a sample grid (`grid.png`) from the EMA weights.
A resumed run may change its training options (`TRAINING_OPTIONS`: learning rate, loss
weighting, ...), never the model's shape; each change is kept with its step in the run's
`history`, so a model's record says how it was made.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import numpy as np
import torch
from PIL import Image
from pydantic import Field

from genattr.customize.pipeline import load_base_pipeline
from genattr.errors import GenattrError
from genattr.options import options_from_mapping
from genattr.world.clipart import DEFAULT_DATA_DIR

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import (
        StableDiffusionPipeline,
    )

BASE_FORMAT_VERSION = 1
STATE_NAME = "state.pt"
CONFIG_NAME = "world_base.json"
TRAINING_NAME = "training.json"  # beside a saved pipeline: config, step, history, loss curve
# Options a resumed run may change (recorded in its history); the rest shape the model.
TRAINING_OPTIONS = frozenset(
    {
        "batch_size",
        "learning_rate",
        "warmup_steps",
        "weight_decay",
        "ema_decay",
        "caption_dropout",
        "hflip",
        "snr_gamma",
        "prediction_type",
        "grid_size",
        "grid_steps",
        "grid_guidance",
    }
)
# Classifier-free guidance for every sample of the world: grids, quality checks, the benchmark.
# Measured (experiments/world_guidance.py): at 6, Custom Diffusion's default, the base model's
# samples fall to chance category agreement and customized samples are far less attributable.
GUIDANCE = 3.0
# Values that reproduce runs saved before an option existed.
_ABSENT_MEANS = {"snr_gamma": None, "prediction_type": "epsilon"}


@dataclass
class BaseConfig:
    """Model and training settings of the world's base model (defaults: the committed run)."""

    size: Annotated[int, Field(ge=8)] = 32
    block_out_channels: tuple[int, ...] = (32, 64, 128)
    layers_per_block: Annotated[int, Field(ge=1)] = 1
    attention_head_dim: Annotated[int, Field(ge=1)] = 32
    attention_levels: int = 1
    text_dim: Annotated[int, Field(ge=1)] = 128
    text_layers: Annotated[int, Field(ge=1)] = 2
    text_heads: Annotated[int, Field(ge=1)] = 4
    max_length: Annotated[int, Field(ge=2)] = 24
    min_word_count: int = 3  # rarer caption words are spelt; keeps the embedding table small
    channels_last: bool = True  # ~1.4x faster convolutions on CPU (oneDNN), same numbers
    batch_size: Annotated[int, Field(ge=1)] = 32
    learning_rate: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 1e-3
    warmup_steps: Annotated[int, Field(ge=0)] = 200
    weight_decay: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.0
    ema_decay: Annotated[float, Field(ge=0, lt=1)] = 0.999
    caption_dropout: Annotated[float, Field(ge=0, le=1)] = (
        0.1  # empty prompt, so classifier-free guidance works
    )
    hflip: bool = True
    seed: int = 0
    grid_size: Annotated[int, Field(ge=1)] = 16
    grid_steps: Annotated[int, Field(ge=1)] = 20
    grid_guidance: float = GUIDANCE
    # Min-SNR-gamma loss weighting (Hang et al., ICCV 2023): the image error a step's
    # prediction implies weighs min(SNR, gamma), so the easy low-noise steps no longer dominate
    # and training spends itself on the high-noise steps that shape the global layout.
    # None: the plain loss.
    snr_gamma: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = 5.0
    # What the UNet predicts. "v_prediction" (Salimans & Ho 2022) makes the high-noise steps
    # predict the image itself rather than noise that must be divided by a tiny sqrt(alpha_bar),
    # so an undertrained model still starts its samples from a plausible layout. A run may
    # switch from epsilon to v on resume (Stable Diffusion 2's v-model was fine-tuned so).
    prediction_type: Literal["epsilon", "v_prediction"] = "v_prediction"

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> BaseConfig:
        """Checked as plans' options are: unknown keys, types and ranges, in one line."""
        return options_from_mapping(cls, values, "base-model")


def build_models(cfg: BaseConfig, tokenizer: Any) -> tuple[Any, Any]:
    """A fresh (seeded) UNet and text encoder for this config and tokenizer."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(cfg.seed)
    # Attention (self and cross) only at the lowest `attention_levels` resolutions: on a CPU,
    # attention over 16x16 or 32x32 positions costs more than all the convolutions.
    n = len(cfg.block_out_channels)
    k = max(1, min(cfg.attention_levels, n))
    down = ("DownBlock2D",) * (n - k) + ("CrossAttnDownBlock2D",) * k
    up = ("CrossAttnUpBlock2D",) * k + ("UpBlock2D",) * (n - k)
    unet = UNet2DConditionModel(
        sample_size=cfg.size,
        in_channels=3,
        out_channels=3,
        layers_per_block=cfg.layers_per_block,
        block_out_channels=cfg.block_out_channels,
        down_block_types=down,
        up_block_types=up,
        cross_attention_dim=cfg.text_dim,
        attention_head_dim=cfg.attention_head_dim,
        norm_num_groups=min(32, cfg.block_out_channels[0] // 2),
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=cfg.text_dim,
            intermediate_size=cfg.text_dim * 2,
            num_hidden_layers=cfg.text_layers,
            num_attention_heads=cfg.text_heads,
            max_position_embeddings=cfg.max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    return unet, text_encoder


def make_scheduler(prediction_type: str = "epsilon") -> Any:
    """DDIM over the linear DDPM schedule (pixel space). Predicted images are clipped to the
    pixel range, as pixel-space DDPM samplers do; StableDiffusionPipeline forces `clip_sample`
    off, so the clipping is `thresholding` with a ceiling of 1 (the same clamp to [-1, 1])."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=1e-4,
        beta_end=0.02,
        beta_schedule="linear",
        prediction_type=prediction_type,
        clip_sample=False,
        thresholding=True,
        sample_max_value=1.0,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def make_pipeline(
    unet: Any, text_encoder: Any, tokenizer: Any, prediction_type: str = "epsilon"
) -> StableDiffusionPipeline:
    """The world model as a Stable Diffusion pipeline (identity VAE, no safety checker)."""
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import (
        StableDiffusionPipeline,
    )

    # deferred: world.vae subclasses diffusers' models (imports diffusers), and genattr.cli
    # imports this module
    from genattr.world.vae import IdentityVAE

    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=IdentityVAE(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=make_scheduler(prediction_type),
        # diffusers takes None for both (documented; requires_safety_checker=False) but
        # annotates them as required components
        safety_checker=None,  # type: ignore[arg-type]
        feature_extractor=None,  # type: ignore[arg-type]
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


# -- training ------------------------------------------------------------------------------
def sample(
    pipe: StableDiffusionPipeline,
    prompts: Sequence[str],
    steps: int = 25,
    guidance: float = GUIDANCE,
    seed: int = 0,
) -> np.ndarray:
    """uint8 (N, H, W, 3) samples, one per prompt, each with its own seeded generator."""
    gens = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
    with torch.inference_mode():
        out = pipe(
            list(prompts),
            generator=gens,
            num_inference_steps=steps,
            guidance_scale=guidance,
            output_type="np",
        ).images
    return (np.clip(out, 0, 1) * 255).round().astype(np.uint8)


def image_grid(images: np.ndarray, cols: int = 8, scale: int = 2) -> Any:
    """A PIL grid of uint8 images (upscaled `scale` times, nearest, to keep pixels honest)."""
    n, h, w, _ = images.shape
    rows = -(-n // cols)
    grid = np.full((rows * (h + 2), cols * (w + 2), 3), 128, np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        grid[r * (h + 2) + 1 : r * (h + 2) + 1 + h, c * (w + 2) + 1 : c * (w + 2) + 1 + w] = im
    pil = Image.fromarray(grid)
    return pil.resize((pil.width * scale, pil.height * scale), Image.Resampling.NEAREST)


def describe_training(record: dict[str, Any]) -> str:
    """One sentence on how a saved pipeline was trained, from its `training.json`."""
    history = record.get("history", [])
    start = {**_ABSENT_MEANS, **record["config"]}
    for h in reversed(history):  # the values before each option's first change
        start.update({k: v[0] for k, v in h["changed"].items()})
    weighting = f"min-SNR-{start['snr_gamma']:g}" if start["snr_gamma"] else "plain"
    text = (
        f"trained here from scratch for {record['step']:,} steps of batch {start['batch_size']}, "
        f"{start['prediction_type']} prediction, {weighting} loss"
    )
    for h in history:
        text += f"; from step {h['step']:,}: " + ", ".join(
            f"{k} {v[1]}" for k, v in h["changed"].items()
        )
    return text


def base_model_dir(size: int = 32) -> Path:
    """Where the shipped base model lives (inside the package)."""
    return DEFAULT_DATA_DIR / f"base{size}"


def load_world_base(path: str | os.PathLike | None = None) -> StableDiffusionPipeline:
    """The shipped (or a given) world base model, in float32 on the CPU."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()  # the identity VAE is not an AutoencoderKL
    diffusers.utils.logging.disable_progress_bar()
    transformers.logging.set_verbosity_error()  # long captions are cut to max_length, as trained
    path = Path(path) if path is not None else base_model_dir()
    if not (path / "model_index.json").is_file():
        raise GenattrError(f"{path}: no world base model; run `genattr world build`")
    return load_base_pipeline(path, device="cpu", dtype="float32")
