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

import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Annotated, Any, Literal

import numpy as np
import torch
from pydantic import Field
from rich.progress import track

from genattr.data.official import TestCaseFeatures
from genattr.evaluate import evaluate_protocol
from genattr.heads.checkpoint import MapperPair, write_head_folder
from genattr.heads.networks import create_head
from genattr.vectors import FeatureMatrix


@dataclass
class TrainConfig:
    """Head training options; `genattr.options.options_from_mapping` checks them (types,
    ranges, finite numbers) before any data is read."""

    head: Literal["linear", "channel", "mlp"] = "linear"
    temperature: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 0.07
    lr: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 1e-3
    weight_decay: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 1e-4
    batch_size: Annotated[int, Field(ge=1)] = 128
    epochs: Annotated[int, Field(ge=1)] = 30
    distractors_per_batch: Annotated[int, Field(ge=0)] = 1024
    # "batch": negatives are the batch's other models' exemplars and the distractors; "all":
    # every training exemplar is a candidate in every step, so a head cannot score well by
    # telling held-out images (exemplars) from the distractors (membership, not attribution).
    exemplar_negatives: Literal["batch", "all"] = "batch"
    # validate on the stricter gallery (every exemplar a distractor for every query)
    strict_validation: bool = False
    patience: Annotated[int, Field(ge=1)] = 5  # epochs without validation mAP gain before stopping
    seed: int = 0
    mlp_hidden_dim: Annotated[int, Field(ge=1)] = 512
    mlp_out_dim: Annotated[int, Field(ge=1)] = 256
    mlp_layers: Annotated[int, Field(ge=1)] = 2


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
    validation: tuple[FeatureMatrix, TestCaseFeatures] | None = None,
    progress: bool = False,
) -> TrainResult:
    """Fit the real and synth heads; `validation` = (distractor gallery, val test case)."""
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    tensors = _TrainingTensors.from_pairs(data)
    real, syn = _new_heads(config, tensors.exemplars.shape[-1])
    params = list(real.parameters()) + list(syn.parameters())
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    if config.exemplar_negatives not in ("batch", "all"):
        raise ValueError(
            f"exemplar_negatives must be batch or all, not {config.exemplar_negatives!r}"
        )
    result = TrainResult(MapperPair(real, syn, config.head), config)
    best = _BestHeads()
    if validation is not None:  # the untrained heads are the baseline to beat (epoch -1)
        best.keep(result.mappers, _validation_map(result.mappers, config, validation))
        result.history.append({"epoch": -1, "loss": float("nan"), "val_mAP": best.score})
    for epoch in _epochs(config, progress):
        losses = _train_epoch(result.mappers, opt, tensors, config, gen)
        entry = {"epoch": epoch, "loss": float(np.mean(losses)) if losses else float("nan")}
        if validation is not None:
            entry["val_mAP"] = _validation_map(result.mappers, config, validation)
            if best.offer(result.mappers, entry["val_mAP"]):
                result.best_epoch = epoch
        result.history.append(entry)
        if validation is not None and best.since >= config.patience:
            break
    if best.state is not None:
        real.load_state_dict(best.state[0])
        syn.load_state_dict(best.state[1])
    elif validation is None:
        result.best_epoch = len(result.history) - 1
    real.eval(), syn.eval()
    return result


@dataclass
class _TrainingTensors:
    """The training features as float (V, N, D) views, and the model of every row."""

    exemplars: torch.Tensor
    synth: torch.Tensor
    distractors: torch.Tensor | None
    model_of_exemplar: torch.Tensor  # (E,) model index of each exemplar
    synth_model: torch.Tensor  # (Q,) model index of each synthesized image
    all_exemplars: torch.Tensor  # (E,) every exemplar row, the candidates of "all"

    @classmethod
    def from_pairs(cls, data: PairedFeatures) -> _TrainingTensors:
        """Views and model indices of `data`, as every training step reads them."""
        chunks = torch.tensor(data.exemplar_chunks)
        model_of_exemplar = torch.repeat_interleave(
            torch.arange(len(chunks)), chunks[:, 1] - chunks[:, 0]
        )
        return cls(
            _views(data.exemplars).float(),
            _views(data.synth).float(),
            None if data.distractors is None else _views(data.distractors).float(),
            model_of_exemplar,
            torch.as_tensor(data.synth_model),
            torch.arange(len(model_of_exemplar)),
        )


def _new_heads(config: TrainConfig, dim: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The real head, then the synth head, fresh (the real one draws its weights first)."""
    kwargs = {}
    if config.head == "mlp":
        kwargs = {
            "hidden_dim": config.mlp_hidden_dim,
            "out_dim": config.mlp_out_dim,
            "num_layers": config.mlp_layers,
        }
    return create_head(config.head, dim, **kwargs), create_head(config.head, dim, **kwargs)


def _validation_map(
    mappers: MapperPair, config: TrainConfig, validation: tuple[FeatureMatrix, TestCaseFeatures]
) -> float:
    """Mean val mAP of the heads as they are now (evaluated in eval mode, left in train mode)."""
    real, syn = mappers.real, mappers.synth
    real.eval(), syn.eval()
    res = evaluate_protocol(
        validation[0],
        validation[1],
        (10,),
        MapperPair(real, syn, config.head),
        exemplars_as_distractors=config.strict_validation,
    )
    real.train(), syn.train()
    return float(np.mean([s["mAP"] for s in res.summary().values()]))


def _epochs(config: TrainConfig, progress: bool) -> Iterable[int]:
    """The epoch numbers, behind a progress bar if asked."""
    epochs: Iterable[int] = range(config.epochs)
    if progress:
        epochs = track(epochs, description="training heads")
    return epochs


def _train_epoch(
    mappers: MapperPair,
    opt: torch.optim.Optimizer,
    tensors: _TrainingTensors,
    config: TrainConfig,
    gen: torch.Generator,
) -> list[float]:
    """One pass over the synthesized images in a random order, a step per batch; the losses."""
    order = torch.randperm(len(tensors.synth_model), generator=gen)
    losses = []
    for b0 in range(0, len(order), config.batch_size):
        rows = order[b0 : b0 + config.batch_size]
        if len(rows) < 2:
            continue
        loss = _batch_loss(mappers, rows, tensors, config, gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _batch_loss(
    mappers: MapperPair,
    rows: torch.Tensor,
    tensors: _TrainingTensors,
    config: TrainConfig,
    gen: torch.Generator,
) -> torch.Tensor:
    """The NT-Xent loss of one batch of synthesized images (`rows`) against its candidates."""
    cand, positive = _candidates(mappers.real, rows, tensors, config, gen)
    q = torch.nn.functional.normalize(mappers.synth(_pick(tensors.synth, rows, gen)), dim=-1)
    cand = torch.nn.functional.normalize(cand, dim=-1)
    return nt_xent_multi_positive(q, cand, positive, config.temperature)


def _candidates(
    real: torch.nn.Module,
    rows: torch.Tensor,
    tensors: _TrainingTensors,
    config: TrainConfig,
    gen: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch's candidates through the real head (exemplars, then random distractors) and
    which of them are each query's positives (its own model's exemplars)."""
    synth_model, model_of_exemplar = tensors.synth_model, tensors.model_of_exemplar
    if config.exemplar_negatives == "all":
        ex_rows = tensors.all_exemplars
    else:
        models = synth_model[rows].unique()
        ex_rows = torch.nonzero(torch.isin(model_of_exemplar, models)).flatten()
    cand = real(_pick(tensors.exemplars, ex_rows, gen))
    positive = synth_model[rows][:, None] == model_of_exemplar[ex_rows][None, :]
    distractors = tensors.distractors
    if distractors is not None and config.distractors_per_batch:
        d_rows = torch.randint(
            0, distractors.shape[1], (config.distractors_per_batch,), generator=gen
        )
        cand = torch.cat([cand, real(_pick(distractors, d_rows, gen))])
        positive = torch.cat([positive, torch.zeros(len(rows), len(d_rows), dtype=torch.bool)], 1)
    return cand, positive


class _BestHeads:
    """Early stopping's memory: the best val mAP so far, the heads' weights then, and the
    epochs since."""

    def __init__(self) -> None:
        self.state: tuple[dict, dict] | None = None
        self.score: float = -np.inf
        self.since = 0

    def keep(self, mappers: MapperPair, score: float) -> None:
        """Take these heads and their score as the best so far, whatever the score."""
        self.score = score
        self.state = (_copy_state(mappers.real), _copy_state(mappers.synth))

    def offer(self, mappers: MapperPair, score: float) -> bool:
        """Keep the heads if `score` beats the best, else count an epoch without gain."""
        if score > self.score:
            self.since = 0
            self.keep(mappers, score)
            return True
        self.since += 1
        return False


def _copy_state(module: torch.nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def save_heads(result: TrainResult, out_dir: str | os.PathLike, **provenance: Any) -> None:
    """The head folder of a training run: the maps, its config, curve and provenance."""
    write_head_folder(
        result.mappers,
        out_dir,
        config=asdict(result.config),
        history=result.history,
        best_epoch=result.best_epoch,
        **provenance,
    )
