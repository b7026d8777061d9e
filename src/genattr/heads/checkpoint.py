"""Where a trained head lives on disk, and the one object every stage reads it as.

A head is a `MapperPair`: the map for real (training) images and the map for synthesized ones.
It is stored two ways: genattr's head folder (`head.safetensors` with `real.*` / `synth.*`
tensors, `head.json` with kind, dims, training config and provenance) and the authors' mapper
`.pth` (`{"real_mapper": state_dict, "synth_mapper": state_dict}`), so their `eval.py` loads
ours and ours loads theirs.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from genattr.atomic import atomic_path, write_text_atomic
from genattr.data.official import load_torch_dict, require_keys
from genattr.errors import GenattrError, validation_reason
from genattr.heads.networks import head_from_state_dict, head_in_out, infer_head_kind

HEAD_FORMAT_VERSION = 1


class HeadHeader(BaseModel):
    """head.json as read: kind, version, head kind and dimensions, with their types."""

    model_config = ConfigDict(extra="allow", strict=True)

    kind: Literal["genattr.head"]
    format_version: Literal[1]
    head: Literal["linear", "channel", "mlp", "fastgda"]
    in_dim: Annotated[int, Field(gt=0)]
    out_dim: Annotated[int, Field(gt=0)]


@dataclass
class MapperPair:
    """The two heads of the paper: one for real (training) images, one for synthesized ones."""

    real: nn.Module
    synth: nn.Module
    kind: str

    @property
    def in_dim(self) -> int:
        return head_in_out(self.real)[0]

    @property
    def out_dim(self) -> int:
        return head_in_out(self.real)[1]

    def to(self, device: str | torch.device) -> MapperPair:
        """Both maps on `device` (in place, as `nn.Module.to`); returns self."""
        self.real.to(device)
        self.synth.to(device)
        return self


def write_head_folder(mappers: MapperPair, out_dir: str | os.PathLike, **doc: Any) -> None:
    """head.safetensors + head.json (kind, dims and whatever `doc` records), both atomic."""
    out = Path(out_dir)
    tensors = {f"real.{k}": v.contiguous() for k, v in mappers.real.state_dict().items()}
    shared = mappers.synth is mappers.real  # one map for both sides: written twice, apart
    tensors.update(
        {
            f"synth.{k}": v.clone() if shared else v.contiguous()
            for k, v in mappers.synth.state_dict().items()
        }
    )
    head = {
        "kind": "genattr.head",
        "format_version": HEAD_FORMAT_VERSION,
        "head": mappers.kind,
        "in_dim": mappers.in_dim,
        "out_dim": mappers.out_dim,
        **doc,
    }
    with atomic_path(out / "head.safetensors") as tmp:
        save_file(tensors, str(tmp))
    write_text_atomic(out / "head.json", json.dumps(head, indent=2) + "\n")


def load_heads(path: str | os.PathLike) -> tuple[MapperPair, dict]:
    """A head directory (or its head.json / head.safetensors) -> the two maps and head.json."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    try:
        doc = json.loads((folder / "head.json").read_text())
        tensors = load_file(str(folder / "head.safetensors"))
    except (OSError, ValueError, SafetensorError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise GenattrError(f"{folder}: not a genattr head directory ({reason})") from None
    if (
        not isinstance(doc, dict)
        or doc.get("kind") != "genattr.head"
        or doc.get("format_version") != HEAD_FORMAT_VERSION
    ):
        raise GenattrError(f"{folder}/head.json: not a genattr head (format_version 1)")
    try:
        header = HeadHeader.model_validate(doc)
    except ValidationError as e:
        raise GenattrError(f"{folder}/head.json: damaged ({validation_reason(e)})") from None
    parts = {}
    for side in ("real", "synth"):
        state = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith(side + ".")}
        try:
            parts[side] = head_from_state_dict(state, header.head)
        except (ValueError, RuntimeError, KeyError) as e:
            raise GenattrError(f"{folder}: {side} head: {str(e).splitlines()[0]}") from None
        shape = head_in_out(parts[side])
        if shape != (header.in_dim, header.out_dim):
            raise GenattrError(
                f"{folder}: the {side} head maps {shape[0]} -> {shape[1]} dimensions, "
                f"head.json says {header.in_dim} -> {header.out_dim}"
            )
    return MapperPair(parts["real"], parts["synth"], header.head), doc


def load_mapper_pth(path: str | os.PathLike, kind: str | None = None) -> MapperPair:
    """The authors' mapper checkpoint, checked: known head kind, finite, both sides alike."""
    obj = load_torch_dict(path, "mapper checkpoint")
    require_keys(path, obj, ("real_mapper", "synth_mapper"), "mapper checkpoint")
    try:
        heads = [head_from_state_dict(obj[k], kind) for k in ("real_mapper", "synth_mapper")]
        for name, head in zip(("real_mapper", "synth_mapper"), heads, strict=True):
            for pname, p in head.state_dict().items():
                if p.is_floating_point() and not torch.isfinite(p).all():
                    raise ValueError(f"{name}.{pname} has NaN or Inf values")
        if head_in_out(heads[0]) != head_in_out(heads[1]):
            raise ValueError("real_mapper and synth_mapper have different shapes")
    except (ValueError, RuntimeError) as e:
        raise GenattrError(f"{path}: {str(e).splitlines()[0]}") from None
    return MapperPair(heads[0], heads[1], infer_head_kind(obj["real_mapper"]))


def save_mapper_pth(mappers: MapperPair, path: str | os.PathLike) -> None:
    obj = {"real_mapper": mappers.real.state_dict(), "synth_mapper": mappers.synth.state_dict()}
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
