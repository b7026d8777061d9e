"""`genattr evaluate`: feature files or stores and a head in; results.json and parquet out."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from genattr.atomic import check_output
from genattr.data.official import load_gallery_pth, load_testcase_pth
from genattr.devices import resolve_device
from genattr.errors import GenattrError
from genattr.evaluate import DEFAULT_KS, EvaluationResult, evaluate_protocol, write_results
from genattr.store import EmbeddingStore, check_same_backbone, store_to_testcase
from genattr.workflows.artifacts import open_head_for


def evaluate_files(
    gallery_feats: str | os.PathLike,
    test_feats: str | os.PathLike,
    out: str | os.PathLike,
    *,
    mapper: str | os.PathLike | None = None,
    head: str | None = None,
    ks: Sequence[int] = DEFAULT_KS,
    device: str = "cpu",
    progress: bool = False,
) -> EvaluationResult:
    """`genattr evaluate`: features in, results.json + parquet out.

    Args:
        gallery_feats, test_feats: the authors' `.pth` files or genattr embedding store
            folders (stores must share a backbone).
        out: results.json; the per-query table goes beside it.
        mapper: the authors' mapper `.pth` or a genattr head folder (checked against a store).
        head: the mapper's kind when the file does not say (linear, channel, mlp).
        ks: the Recall@K cut-offs.
        device: where the protocol's matrix products run.
        progress: draw a progress bar.
    """
    resolve_device(device)
    check_output(out, "file")
    stores = {}
    if Path(gallery_feats).is_dir() or Path(test_feats).is_dir():
        stores = {
            p: EmbeddingStore.open(p) for p in (gallery_feats, test_feats) if Path(p).is_dir()
        }
        check_same_backbone(*stores.values())
    mappers = None
    if mapper is not None:  # checked before any features are read
        mappers = open_head_for(mapper, next(iter(stores.values()), None), head)[0]
    gallery = (
        stores[gallery_feats].vectors
        if gallery_feats in stores
        else load_gallery_pth(gallery_feats).feats
    )
    testcase = (
        store_to_testcase(stores[test_feats])
        if test_feats in stores
        else load_testcase_pth(test_feats)
    )
    if mappers is not None and mappers.in_dim != gallery.shape[1]:
        raise GenattrError(
            f"{mapper}: the head takes {mappers.in_dim}-d features, {gallery_feats} holds "
            f"{gallery.shape[1]}-d ones"
        )
    names = (str(gallery_feats), str(test_feats), str(mapper))
    result = evaluate_protocol(
        gallery, testcase, ks, mappers, device=device, progress=progress, names=names
    )
    write_results(
        result,
        out,
        gallery_feats=str(gallery_feats),
        test_feats=str(test_feats),
        mapper=None if mapper is None else str(mapper),
        head=None if mappers is None else mappers.kind,
        n_gallery=len(gallery),
    )
    return result
