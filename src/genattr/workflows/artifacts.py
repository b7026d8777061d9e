"""Opening artifacts and checking they fit together: one place for each refusal."""

from __future__ import annotations

import os
from pathlib import Path

from genattr.errors import GenattrError
from genattr.features.registry import Backbone
from genattr.heads.checkpoint import MapperPair, load_heads, load_mapper_pth
from genattr.store import BackboneInfo, EmbeddingStore


def check_head_fits(
    mappers: MapperPair,
    doc: dict | None,
    target: EmbeddingStore | Backbone,
    head: str | os.PathLike,
) -> None:
    """Refuse a head whose input size differs from the features of `target` (a store, or the
    backbone about to embed), or that its head.json says was trained on other weights."""
    if isinstance(target, EmbeddingStore):
        info, holder = target.backbone, str(target.path)
    else:
        info, holder = BackboneInfo.from_backbone(target), "the backbone"
    if mappers.in_dim != target.dim:
        raise GenattrError(
            f"{head}: the head takes {mappers.in_dim}-d features, {holder} gives "
            f"{target.dim}-d {info.describe()}"
        )
    if doc and doc.get("weights_id") not in (None, info.weights_id):
        raise GenattrError(
            f"{head}: trained on {doc.get('backbone')} features "
            f"({doc.get('weights_id')}), {holder} gives {info.describe()}"
        )


def open_head_for(
    head: str | os.PathLike,
    target: EmbeddingStore | Backbone | None = None,
    kind: str | None = None,
) -> tuple[MapperPair, dict | None]:
    """A head folder or the authors' mapper `.pth`, checked against `target` when given;
    returns the maps and head.json (None for a `.pth`, which records no provenance)."""
    path = Path(head)
    if path.is_dir() or path.name in ("head.json", "head.safetensors"):
        mappers, doc = load_heads(path)
        if kind is not None and kind != mappers.kind:
            raise GenattrError(f"{head}: a {mappers.kind} head, not {kind}")
    else:
        mappers, doc = load_mapper_pth(path, kind), None
    if target is not None:
        check_head_fits(mappers, doc, target, head)
    return mappers, doc


def head_folder(head: str | os.PathLike) -> Path:
    """The folder of a head given as its folder or one of its two files."""
    path = Path(head)
    if path.is_dir():
        return path
    if path.name in ("head.json", "head.safetensors"):
        return path.parent
    what = "no such folder" if not path.exists() else "a file, not a head folder"
    raise GenattrError(
        f"{head}: {what}; give the folder `genattr train-head` wrote (an authors' mapper .pth "
        "becomes one with `genattr head import`)"
    )
