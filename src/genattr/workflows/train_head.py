"""`genattr train-head`, `head import` and `head export`: stores and manifests in, head folders
and the authors' mapper `.pth` out."""

from __future__ import annotations

import os
from dataclasses import asdict

import numpy as np
import torch

from genattr.atomic import check_output
from genattr.data.benchmark import read_benchmark
from genattr.data.official import TestCaseFeatures
from genattr.errors import GenattrError
from genattr.heads.checkpoint import (
    MapperPair,
    load_heads,
    load_mapper_pth,
    save_mapper_pth,
    write_head_folder,
)
from genattr.heads.distill import DistillConfig, DistillResult, distill_heads, read_teacher
from genattr.heads.train import PairedFeatures, TrainConfig, TrainResult, save_heads, train_heads
from genattr.options import options_from_mapping
from genattr.store import EmbeddingStore, check_same_backbone
from genattr.store.join import rows_by_path, testcase_from_stores, view_tensor
from genattr.vectors import FeatureMatrix

MAX_DISTRACTOR_POOL = 200_000


def training_pairs_from_stores(
    tc: TestCaseFeatures, store_real: EmbeddingStore, store_synth: EmbeddingStore, models: set[int]
) -> PairedFeatures:
    """The `models`' exemplars and synthesized images with every stored view, for training."""

    real_rows, synth_rows = rows_by_path(store_real), rows_by_path(store_synth)
    chunks: list[tuple[int, int]] = []
    ex_rows: list[list[int]] = []
    for m in sorted(models):
        start, end = tc.exemplar_chunks[m]
        first = len(ex_rows)
        ex_rows += [real_rows[os.path.normpath(p)] for p in tc.exemplar_paths[start:end]]
        chunks.append((first, len(ex_rows)))
    renumber = {m: k for k, m in enumerate(sorted(models))}
    q_rows, q_model = [], []
    for p in tc.prompt_types:
        for path, m in zip(tc.synth_paths[p], tc.synth_ids[p], strict=True):
            if m in renumber:
                q_rows.append(synth_rows[os.path.normpath(path)])
                q_model.append(renumber[m])
    return PairedFeatures(
        view_tensor(store_real, ex_rows),
        chunks,
        view_tensor(store_synth, q_rows),
        np.asarray(q_model, dtype=np.int64),
    )


def train_heads_from_stores(
    bench: str | os.PathLike,
    store_real: str | os.PathLike,
    store_synth: str | os.PathLike,
    out: str | os.PathLike,
    config: TrainConfig,
    *,
    distractors: str | os.PathLike | None = None,
    progress: bool = False,
) -> TrainResult:
    """`genattr train-head`: train on the manifest's train models, stop early on its val models.

    Args:
        bench: the benchmark manifest (train and val models).
        store_real, store_synth: embedding stores of the exemplars and synthesized images.
        out: the head folder to write.
        config: the training options (checked again here).
        distractors: a store of distractor training images for the candidates (and the
            stricter validation), if any.
        progress: draw a progress bar.
    """
    config = options_from_mapping(TrainConfig, asdict(config), "train-head")
    check_output(out, "dir")
    manifest = read_benchmark(bench)
    real, synth = EmbeddingStore.open(store_real), EmbeddingStore.open(store_synth)
    tc, notes = testcase_from_stores(manifest, real, synth)
    splits = {
        s: {i for i, m in enumerate(manifest.models) if m.split == s} for s in ("train", "val")
    }
    if not splits["train"]:
        raise GenattrError(f"{bench}: no models with split 'train'")
    pool = None
    validation: tuple[FeatureMatrix, TestCaseFeatures] | None = None
    if distractors is not None:
        dstore = EmbeddingStore.open(distractors)
        check_same_backbone(real, dstore)
        # negatives are drawn from a seeded sample, so a 1M-image store costs ~600 MB, not 3 GB
        rows = np.arange(len(dstore.vectors))
        if len(rows) > MAX_DISTRACTOR_POOL:
            rows = np.sort(
                np.random.default_rng(config.seed).choice(rows, MAX_DISTRACTOR_POOL, replace=False)
            )
        pool = torch.from_numpy(np.asarray(dstore.vectors[rows], dtype=np.float32))
        if splits["val"]:
            validation = (dstore.vectors, tc.select_models(splits["val"]))
    elif splits["val"]:
        validation = (tc.exemplar_feats[:0], tc.select_models(splits["val"]))
    data = training_pairs_from_stores(tc, real, synth, splits["train"])
    data.distractors = pool
    result = train_heads(data, config, validation, progress=progress)
    save_heads(
        result,
        out,
        backbone=real.backbone.name,
        weights_id=real.backbone.weights_id,
        bench=str(bench),
        notes=notes,
    )
    return result


def export_mapper_pth(head_dir: str | os.PathLike, out: str | os.PathLike) -> MapperPair:
    """A genattr head directory -> the authors' mapper `.pth` (their eval.py loads it)."""
    mappers, _ = load_heads(head_dir)
    save_mapper_pth(mappers, out)
    return mappers


def import_mapper_pth(
    pth: str | os.PathLike, out_dir: str | os.PathLike, kind: str | None = None, **provenance: str
) -> MapperPair:
    """The authors' mapper `.pth` -> a genattr head directory (for `index build --head`)."""
    mappers = load_mapper_pth(pth, kind)
    save_heads(
        TrainResult(mappers, options_from_mapping(TrainConfig, {"head": mappers.kind}, "head")),
        out_dir,
        imported_from=str(pth),
        **provenance,
    )
    return mappers


def distill_head_from_stores(
    teacher: str | os.PathLike,
    store_real: str | os.PathLike,
    store_synth: str | os.PathLike,
    out: str | os.PathLike,
    config: DistillConfig,
) -> DistillResult:
    """`genattr train-head --objective distill`: a head trained to reproduce a teacher's
    ranking (`genattr.heads.distill`); the teacher's queries are looked up in the synth
    store and its candidates in the real store, by path (view 0)."""
    config = options_from_mapping(DistillConfig, asdict(config), "train-head --objective distill")
    check_output(out, "dir")
    target = read_teacher(teacher)
    real, synth = EmbeddingStore.open(store_real), EmbeddingStore.open(store_synth)
    check_same_backbone(real, synth)
    features = []
    for store, paths, what in (
        (synth, target.query_paths, "query"),
        (real, target.candidate_paths, "candidate"),
    ):
        rows = rows_by_path(store)
        missing = [p for p in paths if os.path.normpath(p) not in rows]
        if missing:
            raise GenattrError(
                f"{len(missing)} {what} image(s) not in {store.path}, e.g. {missing[0]}"
            )
        index = np.array([rows[os.path.normpath(p)][0] for p in paths])
        features.append(torch.from_numpy(np.asarray(store.vectors[index], dtype=np.float32)))
    result = distill_heads(features[0], features[1], target.scores, config)
    write_head_folder(
        result.mappers,
        out,
        objective="distill",
        config=asdict(config),
        history=result.history,
        teacher=str(teacher),
        teacher_method=target.method,
        backbone=real.backbone.name,
        weights_id=real.backbone.weights_id,
    )
    return result
