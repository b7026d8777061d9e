"""`genattr index build`: embedding stores (and a head folder) in, an attribution index out."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from genattr.atomic import check_output
from genattr.errors import GenattrError
from genattr.search.index import AttributionIndex, build_index
from genattr.store import EmbeddingStore, ShardedVectors, check_same_backbone
from genattr.workflows.artifacts import head_folder, open_head_for


def build_index_from_store(
    store: str | os.PathLike | Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    head: str | os.PathLike | None = None,
    kind: str = "auto",
    memory_budget: str | int = "4GB",
    progress: bool = False,
) -> AttributionIndex:
    """`genattr index build`: index one store's vectors, or several stores' of one backbone as
    one gallery (in the order given), recording the backbone and the head.

    Args:
        store: one store folder, or several of one backbone.
        out: the index folder to write.
        head: a head folder from `train-head` (the gallery is mapped through its real side).
        kind: auto, flat, ivf, ivfpq, ivf-ondisk or ivfpq-ondisk.
        memory_budget: RAM the index may use (e.g. "4GB"), for `auto` and the build.
        progress: draw a progress bar.
    """
    paths = [store] if isinstance(store, (str, os.PathLike)) else list(store)
    if not paths:
        raise GenattrError("no store to index")
    check_output(out, "dir")
    stores = [EmbeddingStore.open(p) for p in paths]
    check_same_backbone(*stores)
    s = stores[0]
    if len({x.dtype for x in stores}) > 1:
        raise GenattrError("the stores hold vectors of different dtypes; convert one first")
    mappers, head_dir = None, None
    if head is not None:
        head_dir = head_folder(head)
        mappers = open_head_for(head_dir, s)[0]
    provenance = {
        "store": [str(Path(p).resolve()) for p in paths]
        if len(paths) > 1
        else str(Path(paths[0]).resolve()),
        "backbone": {
            "name": s.backbone.name,
            "weights_id": s.backbone.weights_id,
            "weights_path": s.extra.get("weights_path"),
            "preprocess_config": s.backbone.preprocess_config,
        },
    }
    vectors = (
        s.vectors
        if len(stores) == 1
        else ShardedVectors([sh for x in stores for sh in x.vectors.shards], s.dim, s.dtype)
    )
    return build_index(
        vectors,
        out,
        kind=kind,
        memory_budget=memory_budget,
        head=mappers,
        head_dir=head_dir,
        ids=[i for x in stores for i in x.ids],
        paths=[p for x in stores for p in x.paths],
        files=[f for x in stores for f in x.file_paths],
        provenance=provenance,
        progress=progress,
    )
