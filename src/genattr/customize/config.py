"""What a Custom Diffusion run is told: its options (`CustomizeConfig`, typed and checked),
its concepts, their modifier tokens and training prompts, and a captioned set's captions."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field

from genattr.errors import GenattrError
from genattr.options import options_from_mapping

WEIGHTS_NAME = "pytorch_custom_diffusion_weights.bin"
INFO_NAME = "genattr_customize.json"
CUSTOMIZE_FORMAT_VERSION = 1


@dataclass
class CustomizeConfig:
    """Custom Diffusion's defaults (diffusers `train_custom_diffusion.py` and its README)."""

    modifier_token: str = "<new1>"
    initializer_token: str = "ktn"  # a rare CLIP token, Custom Diffusion's default
    learning_rate: Annotated[float, Field(gt=0)] = 1e-5
    scale_lr: bool = True  # lr x batch size (x2 with regularisation), as `--scale_lr`
    train_batch_size: Annotated[int, Field(ge=1)] = 2
    max_train_steps: Annotated[int, Field(ge=1)] = 250
    resolution: Annotated[int, Field(ge=8)] = 512
    hflip: bool = True
    augment: bool = True  # random rescale with a loss mask and "far away"/"close up" prompts
    prior_loss_weight: Annotated[float, Field(ge=0)] = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_grad_norm: Annotated[float, Field(gt=0)] = 1.0
    seed: int = 42
    gradient_checkpointing: bool = False  # less GPU memory for about 30% more time
    # diffusers' `--freeze_model`: "crossattn_kv" trains every attn2's to_k/to_v (Custom
    # Diffusion); "crossattn" also its to_q and to_out (all of cross-attention).
    freeze_model: Literal["crossattn_kv", "crossattn"] = "crossattn_kv"

    def effective_lr(self, with_prior: bool) -> float:
        if not self.scale_lr:
            return self.learning_rate
        return self.learning_rate * self.train_batch_size * (2.0 if with_prior else 1.0)

    def record(self) -> dict[str, Any]:
        """The options as models and plan keys record them. Options added later are left out
        while they keep their defaults, so models made before them keep their bytes and keys."""
        out = asdict(self)
        if self.freeze_model == "crossattn_kv":
            del out["freeze_model"]
        return out


@dataclass
class Concept:
    """One concept of a Custom Diffusion model: its exemplars, mode ('object', 'style' or
    'captioned'), category (objects), modifier token (default `<newK>` for the K-th concept,
    from 1) and initializer (default the config's `initializer_token`).

    A 'captioned' concept is a set of images each trained with its own caption (`captions`,
    one per image in `list_images` order) and no modifier token: the paper's models tuned on
    random captioned images (MSCOCO) to test whether attribution generalizes."""

    exemplars: Sequence[str | os.PathLike]
    mode: str
    category: str | None = None
    token: str | None = None
    initializer: str | None = None
    captions: Sequence[str] | None = None


def concept_token(k: int) -> str:
    """The modifier token of the k-th concept (0-based): `<new1>`, `<new2>`, ..."""
    return f"<new{k + 1}>"


def config_from_dict(values: dict[str, Any] | None) -> CustomizeConfig:
    """A config from a plan's `train:` mapping; unknown keys and ill-typed values are errors."""
    return options_from_mapping(CustomizeConfig, values, "training")


def training_prompt(mode: str, category: str | None, token: str = "<new1>") -> str:
    """The authors' training prompts: '<new1> {category}' (objects), a style sentence (styles).
    Captioned sets have none: each image is trained with its own caption."""
    if mode == "captioned":
        raise GenattrError("a captioned set trains each image with its own caption")
    if mode == "object":
        if not category:
            raise GenattrError(
                f"object models need a --category (the training prompt is '{token} CATEGORY')"
            )
        return f"{token} {category}"
    if mode == "style":
        return f"A picture in the style of {token} art"
    raise GenattrError(f"mode must be 'object', 'style' or 'captioned', not {mode!r}")


def check_captions(paths: Sequence[Path], captions: Sequence[str] | None) -> list[str]:
    """One non-empty caption per image of a captioned set, or an error saying what is wrong."""
    caps = [str(c).strip() for c in captions or []]
    if len(caps) != len(paths):
        raise GenattrError(
            f"a captioned set needs one caption per image: {len(paths)} images, "
            f"{len(caps)} captions"
        )
    empty = [str(p.name) for p, c in zip(paths, caps, strict=True) if not c]
    if empty:
        raise GenattrError(f"empty caption for {empty[0]}")
    return caps
