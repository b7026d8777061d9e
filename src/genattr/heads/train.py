"""Training the attribution heads (the authors released none of this code).

Two maps, one for real (training) images and one for synthesized ones, start at the identity
(linear) or the SimCLR projector (MLP) and are trained with a multi-positive NT-Xent loss: a
synthesized image should score its own exemplars (one for an object model, several for a
style) above every other candidate in the batch, which are the other models' exemplars and a
pool of distractor training images. Augmentation happens in feature space: each image may have
several pre-extracted augmented views, one drawn per step. Validation mAP comes from the same
`evaluate_protocol` as `genattr evaluate`; the best epoch is kept (early stopping).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from genattr.atomic import atomic_path, write_text_atomic
from genattr.data.official import MapperPair, TestCaseFeatures
from genattr.errors import GenattrError
from genattr.evaluate import evaluate_protocol
from genattr.heads.networks import create_head, head_from_state_dict, head_in_out

HEAD_FORMAT_VERSION = 1
MAX_DISTRACTOR_POOL = 200_000


@dataclass
class TrainConfig:
    head: str = "linear"
    temperature: float = 0.07
    lr: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 128
    epochs: int = 30
    distractors_per_batch: int = 1024
    patience: int = 5  # epochs without validation mAP gain before stopping
    seed: int = 0
    mlp_hidden_dim: int = 512
    mlp_out_dim: int = 256
    mlp_layers: int = 2


@dataclass
class PairedFeatures:
    """Training pairs in feature space. Arrays may carry a leading views axis (V, N, D)."""

    exemplars: torch.Tensor  # (E, D) or (V, E, D)
    exemplar_chunks: list[tuple[int, int]]
    synth: torch.Tensor  # (Q, D) or (V, Q, D)
    synth_model: np.ndarray  # (Q,) model index per synthesized image
    distractors: torch.Tensor | None = None  # (N, D) or (V, N, D)

    @classmethod
    def from_testcase(cls, tc: TestCaseFeatures, distractors: torch.Tensor | None = None):
        ptypes = tc.prompt_types
        return cls(
            tc.exemplar_feats,
            list(tc.exemplar_chunks),
            torch.cat([tc.synth_feats[p] for p in ptypes]),
            np.concatenate([np.asarray(tc.synth_ids[p], dtype=np.int64) for p in ptypes]),
            distractors,
        )


@dataclass
class TrainResult:
    mappers: MapperPair
    config: TrainConfig
    history: list[dict] = field(default_factory=list)  # per epoch: loss, val mAP
    best_epoch: int = -1


def _views(x: torch.Tensor) -> torch.Tensor:
    return x if x.ndim == 3 else x[None]


def _pick(x: torch.Tensor, rows: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One random view per requested row."""
    view = torch.randint(0, x.shape[0], (len(rows),), generator=gen)
    return x[view, rows]


def nt_xent_multi_positive(
    queries: torch.Tensor, candidates: torch.Tensor, positive: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Cross-entropy to a uniform target over each query's positives among all candidates.

    queries (B, D) and candidates (C, D) normalised; positive (B, C) bool.
    """
    logits = queries @ candidates.T / temperature
    log_p = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    pos = positive.float()
    return -((log_p * pos).sum(1) / pos.sum(1)).mean()


def train_heads(
    data: PairedFeatures,
    config: TrainConfig,
    validation: tuple[torch.Tensor | np.ndarray, TestCaseFeatures] | None = None,
    progress: bool = False,
) -> TrainResult:
    """Fit the real and synth heads; `validation` = (distractor gallery, val test case)."""
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    exemplars, synth = _views(data.exemplars).float(), _views(data.synth).float()
    distractors = None if data.distractors is None else _views(data.distractors).float()
    dim = exemplars.shape[-1]
    kwargs = {}
    if config.head == "mlp":
        kwargs = {
            "hidden_dim": config.mlp_hidden_dim,
            "out_dim": config.mlp_out_dim,
            "num_layers": config.mlp_layers,
        }
    real, syn = create_head(config.head, dim, **kwargs), create_head(config.head, dim, **kwargs)
    params = list(real.parameters()) + list(syn.parameters())
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    chunks = torch.tensor(data.exemplar_chunks)
    model_of_exemplar = torch.repeat_interleave(
        torch.arange(len(chunks)), chunks[:, 1] - chunks[:, 0]
    )
    synth_model = torch.as_tensor(data.synth_model)

    def val_map() -> float:
        real.eval(), syn.eval()
        res = evaluate_protocol(
            validation[0], validation[1], (10,), MapperPair(real, syn, config.head)
        )
        real.train(), syn.train()
        return float(np.mean([s["mAP"] for s in res.summary().values()]))

    result = TrainResult(MapperPair(real, syn, config.head), config)
    best_state, best_score, since_best = None, -np.inf, 0
    if validation is not None:  # the untrained heads are the baseline to beat (epoch -1)
        best_score = val_map()
        best_state = (_copy_state(real), _copy_state(syn))
        result.history.append({"epoch": -1, "loss": float("nan"), "val_mAP": best_score})
    epochs = range(config.epochs)
    if progress:
        from rich.progress import track

        epochs = track(epochs, description="training heads")
    for epoch in epochs:
        order = torch.randperm(len(synth_model), generator=gen)
        losses = []
        for b0 in range(0, len(order), config.batch_size):
            rows = order[b0 : b0 + config.batch_size]
            if len(rows) < 2:
                continue
            models = synth_model[rows].unique()
            ex_rows = torch.nonzero(torch.isin(model_of_exemplar, models)).flatten()
            cand = real(_pick(exemplars, ex_rows, gen))
            positive = synth_model[rows][:, None] == model_of_exemplar[ex_rows][None, :]
            if distractors is not None and config.distractors_per_batch:
                d_rows = torch.randint(
                    0, distractors.shape[1], (config.distractors_per_batch,), generator=gen
                )
                cand = torch.cat([cand, real(_pick(distractors, d_rows, gen))])
                positive = torch.cat(
                    [positive, torch.zeros(len(rows), len(d_rows), dtype=torch.bool)], 1
                )
            q = torch.nn.functional.normalize(syn(_pick(synth, rows, gen)), dim=-1)
            cand = torch.nn.functional.normalize(cand, dim=-1)
            loss = nt_xent_multi_positive(q, cand, positive, config.temperature)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        entry = {"epoch": epoch, "loss": float(np.mean(losses)) if losses else float("nan")}
        if validation is not None:
            entry["val_mAP"] = val_map()
            if entry["val_mAP"] > best_score:
                best_score, since_best, result.best_epoch = entry["val_mAP"], 0, epoch
                best_state = (_copy_state(real), _copy_state(syn))
            else:
                since_best += 1
        result.history.append(entry)
        if validation is not None and since_best >= config.patience:
            break
    if best_state is not None:
        real.load_state_dict(best_state[0])
        syn.load_state_dict(best_state[1])
    elif validation is None:
        result.best_epoch = len(result.history) - 1
    real.eval(), syn.eval()
    return result


def _copy_state(module: torch.nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def save_heads(result: TrainResult, out_dir: str | os.PathLike, **provenance) -> None:
    """head.safetensors (real.* and synth.* tensors) + head.json (config, curve, provenance)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    tensors = {f"real.{k}": v.contiguous() for k, v in result.mappers.real.state_dict().items()}
    tensors.update(
        {f"synth.{k}": v.contiguous() for k, v in result.mappers.synth.state_dict().items()}
    )
    in_dim, out_dim = head_in_out(result.mappers.real)
    doc = {
        "kind": "genattr.head",
        "format_version": HEAD_FORMAT_VERSION,
        "head": result.mappers.kind,
        "in_dim": in_dim,
        "out_dim": out_dim,
        "config": asdict(result.config),
        "history": result.history,
        "best_epoch": result.best_epoch,
        **provenance,
    }
    with atomic_path(out / "head.safetensors") as tmp:
        save_file(tensors, str(tmp))
    write_text_atomic(out / "head.json", json.dumps(doc, indent=2) + "\n")


def load_heads(path: str | os.PathLike) -> tuple[MapperPair, dict]:
    """A head directory (or its head.json / head.safetensors) -> the two maps and head.json."""
    from safetensors.torch import load_file

    path = Path(path)
    folder = path if path.is_dir() else path.parent
    try:
        doc = json.loads((folder / "head.json").read_text())
        tensors = load_file(str(folder / "head.safetensors"))
    except (OSError, ValueError) as e:
        raise GenattrError(f"{folder}: not a genattr head directory ({e})") from None
    if doc.get("kind") != "genattr.head" or doc.get("format_version") != HEAD_FORMAT_VERSION:
        raise GenattrError(f"{folder}/head.json: not a genattr head (format_version 1)")
    parts = {}
    for side in ("real", "synth"):
        state = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith(side + ".")}
        parts[side] = head_from_state_dict(state, doc["head"])
    return MapperPair(parts["real"], parts["synth"], doc["head"]), doc


def train_heads_from_stores(
    bench: str | os.PathLike,
    store_real: str | os.PathLike,
    store_synth: str | os.PathLike,
    out: str | os.PathLike,
    config: TrainConfig,
    distractors: str | os.PathLike | None = None,
    progress: bool = False,
) -> TrainResult:
    """`genattr train-head`: train on the manifest's train models, stop early on its val models."""
    from genattr.data.benchmark import read_benchmark
    from genattr.store import EmbeddingStore, check_same_backbone
    from genattr.store.join import testcase_from_stores, training_pairs_from_stores

    manifest = read_benchmark(bench)
    real, synth = EmbeddingStore.open(store_real), EmbeddingStore.open(store_synth)
    tc, notes = testcase_from_stores(manifest, real, synth)
    splits = {
        s: {i for i, m in enumerate(manifest.models) if m.split == s} for s in ("train", "val")
    }
    if not splits["train"]:
        raise GenattrError(f"{bench}: no models with split 'train'")
    pool = None
    validation = None
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
    from genattr.data.official import save_mapper_pth

    mappers, _ = load_heads(head_dir)
    save_mapper_pth(mappers, out)
    return mappers


def import_mapper_pth(
    pth: str | os.PathLike, out_dir: str | os.PathLike, kind: str | None = None, **provenance
) -> MapperPair:
    """The authors' mapper `.pth` -> a genattr head directory (for `index build --head`)."""
    from genattr.data.official import load_mapper_pth

    mappers = load_mapper_pth(pth, kind)
    save_heads(
        TrainResult(mappers, TrainConfig(head=mappers.kind)),
        out_dir,
        imported_from=str(pth),
        **provenance,
    )
    return mappers
