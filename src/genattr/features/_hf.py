"""Shared loading for the backbones that `transformers` implements (CLIP, ViT, DINO, DINOv2).

transformers is imported here, inside functions, so `import genattr.features` stays fast.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from genattr.errors import GenattrError
from genattr.features.preprocess import ImagePreprocess
from genattr.features.registry import Backbone
from genattr.features.weights import hf_weight_files, resolve_hf_dir, weights_id

if TYPE_CHECKING:
    from transformers import PreTrainedModel


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence load reports and progress bars; the checks below report what matters."""
    from transformers.utils import logging

    verbosity, progress = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if progress:
            logging.enable_progress_bar()


def load_pretrained(
    class_name: str,
    directory: Path,
    *,
    backbone: str,
    model_types: tuple[str, ...],
    **kwargs: Any,
) -> PreTrainedModel:
    """`transformers.<class_name>.from_pretrained(directory)` in float32, refusing checkpoints
    of another architecture or with missing weights (which transformers would fill with random
    values, giving plausible-looking but meaningless features)."""
    import transformers

    model_type = json.loads((directory / "config.json").read_text()).get("model_type")
    if model_type not in model_types:
        raise GenattrError(
            f"{directory} holds a {model_type!r} model; backbone {backbone!r} needs one of "
            f"{list(model_types)}"
        )
    cls = getattr(transformers, class_name)
    with _quiet_transformers():
        try:
            model, info = cls.from_pretrained(
                directory, output_loading_info=True, dtype=torch.float32, **kwargs
            )
        except (OSError, ValueError, RuntimeError) as e:
            raise GenattrError(f"cannot load backbone {backbone!r} from {directory}: {e}") from e
    bad = sorted(info.get("missing_keys", ())) + sorted(
        str(k) for k in info.get("mismatched_keys", ())
    )
    if bad:
        raise GenattrError(
            f"checkpoint {directory} does not fit backbone {backbone!r}: missing or mismatched "
            f"weights {bad[:5]}{' ...' if len(bad) > 5 else ''}"
        )
    return model


def hf_backbone(
    *,
    name: str,
    weights: str | os.PathLike | None,
    default_repo: str,
    allow_download: bool,
    cache_dir: str | os.PathLike | None,
    build: Callable[[Path], tuple[torch.nn.Module, int]],
    preprocess: ImagePreprocess,
) -> Backbone:
    """Resolve the weights directory, build the wrapped model with `build(dir) -> (model, dim)`,
    and describe it."""
    directory = resolve_hf_dir(
        weights if weights is not None else default_repo,
        backbone=name,
        allow_download=allow_download,
        cache_dir=cache_dir,
    )
    model, dim = build(directory)
    return Backbone(
        name=name,
        dim=dim,
        model=model,
        preprocess=preprocess,
        preprocess_config=preprocess.to_config(),
        weights_id=weights_id(hf_weight_files(directory)),
        weights_path=str(directory),
    )


class ClsToken(torch.nn.Module):
    """A transformers encoder (ViTModel, Dinov2Model) reduced to its final-layernormed CLS
    token: the feature DINO, DINOv2 and timm's ViT return once their head is removed."""

    def __init__(self, encoder: torch.nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.encoder(pixel_values=pixel_values).last_hidden_state[:, 0]


def clip_tower_config(directory: Path, tower: str) -> dict[str, Any]:
    """`{"config": ...}` for loading one tower ("text" or "vision") of a full CLIP checkpoint,
    which keeps `projection_dim` at its top level where transformers does not carry it into
    the tower config it derives (it would assume 512); {} for a tower-only checkpoint."""
    import transformers

    try:
        model_type = json.loads((directory / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError) as e:
        raise GenattrError(f"{directory}/config.json: unreadable config ({e})") from e
    if model_type != "clip":
        return {}
    full = transformers.CLIPConfig.from_pretrained(directory)
    config = getattr(full, f"{tower}_config")
    if full.projection_dim is None:
        raise GenattrError(f"{directory}/config.json: a CLIP checkpoint without projection_dim")
    config.projection_dim = full.projection_dim
    return {"config": config}
