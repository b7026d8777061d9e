"""Head training on the world, tuned on the val models: what each choice does.

Reads a finished demo folder (`genattr demo --out DEMO`: the unpacked world, its manifest and
one embedding store per backbone) and, per backbone and head setting, trains a head on the
train models with early stopping on the val models (`genattr train-head`'s path), then
reports the best val mAP and that head's test mAP per test case next to raw features.

    .venv/bin/python experiments/world_heads.py --demo demo-out --backbones pixel world-cnn \
        [--heads channel linear mlp] [--temperatures 0.03 0.07 0.2] [--lrs 1e-3 3e-3] \
        [--batch-size 128] [--distractors-per-batch 1024] [--patience 5] \
        [--exemplar-negatives all] [--strict-validation]
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from genattr.data.benchmark import BenchmarkManifest, read_manifest
from genattr.evaluate import evaluate_protocol
from genattr.heads.checkpoint import load_heads
from genattr.heads.train import TrainConfig
from genattr.store import EmbeddingStore
from genattr.store.join import testcase_from_stores
from genattr.workflows.demo import stricter_gallery
from genattr.workflows.train_head import train_heads_from_stores

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # the harness

from harness import emit_row


def case_maps(
    manifest: BenchmarkManifest, stores: Path, head: Path | None, strict: bool = False
) -> dict[str, float]:
    """Test mAP per test case (mean over its prompt types), raw or through `head`; `strict`:
    on the demo's stricter gallery (every held-out exemplar of the world a distractor)."""
    real = EmbeddingStore.open(stores / "exemplars")
    synth = EmbeddingStore.open(stores / "synth")
    gallery = np.asarray(EmbeddingStore.open(stores / "pretrain").vectors, np.float32)
    mappers = load_heads(head)[0] if head is not None else None
    out = {}
    test = [m for m in manifest.models if m.split == "test"]
    for case in ("object", "unobserved", "style"):
        models = [m for m in test if m.extra.get("case", m.mode) == case]
        if not models:
            continue
        tc = testcase_from_stores(BenchmarkManifest(case, models), real, synth)[0]
        g = stricter_gallery(gallery, real, tc) if strict else torch.from_numpy(gallery)
        summary = evaluate_protocol(
            g, tc, mappers=mappers, exemplars_as_distractors=strict
        ).summary()
        out[case] = float(np.mean([s["mAP"] for s in summary.values()]))
    return out


def fmt(maps: dict[str, float]) -> str:
    return " / ".join(f"{v:.4f}" for v in maps.values())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--demo", type=Path, default=Path("demo-out"))
    ap.add_argument("--backbones", nargs="+", default=["pixel", "world-cnn"])
    ap.add_argument("--heads", nargs="+", default=["channel", "linear"])
    ap.add_argument("--temperatures", type=float, nargs="+", default=[0.07])
    ap.add_argument("--lrs", type=float, nargs="+", default=[1e-3])
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    ap.add_argument("--distractors-per-batch", type=int, default=TrainConfig.distractors_per_batch)
    ap.add_argument("--patience", type=int, default=TrainConfig.patience)
    ap.add_argument("--exemplar-negatives", choices=["batch", "all"], default="batch")
    ap.add_argument("--strict-validation", action="store_true")
    args = ap.parse_args()
    manifest_path = args.demo / "world" / "manifest.json"
    manifest = read_manifest(manifest_path)
    print(
        "| backbone | head | temperature | lr | best val mAP (epoch) "
        "| test mAP object / unobserved / style | the same, stricter gallery |"
    )
    print("|---|---|---|---|---|---|---|")
    for name in args.backbones:
        stores = args.demo / "stores" / name
        raw, raw_strict = (case_maps(manifest, stores, None, strict) for strict in (False, True))
        print(f"| {name} | raw | | | | {fmt(raw)} | {fmt(raw_strict)} |")
        emit_row("world_heads", backbone=name, head="raw", test=raw, test_stricter=raw_strict)
        for head, temp, lr in itertools.product(args.heads, args.temperatures, args.lrs):
            t0 = time.perf_counter()
            with tempfile.TemporaryDirectory() as tmp:
                result = train_heads_from_stores(
                    manifest_path,
                    stores / "exemplars",
                    stores / "synth",
                    Path(tmp) / "head",
                    TrainConfig(
                        head=head,
                        temperature=temp,
                        lr=lr,
                        epochs=args.epochs,
                        batch_size=args.batch_size,
                        distractors_per_batch=args.distractors_per_batch,
                        patience=args.patience,
                        exemplar_negatives=args.exemplar_negatives,
                        strict_validation=args.strict_validation,
                    ),
                    distractors=stores / "pretrain",
                )
                test = case_maps(manifest, stores, Path(tmp) / "head")
                test_strict = case_maps(manifest, stores, Path(tmp) / "head", strict=True)
            best = (
                result.history[result.best_epoch]["val_mAP"]
                if result.best_epoch >= 0
                else float("nan")
            )
            print(
                f"| {name} | {head} | {temp:g} | {lr:g} | {best:.4f} ({result.best_epoch}) | "
                f"{fmt(test)} | {fmt(test_strict)} | "
                f"<!-- {time.perf_counter() - t0:.0f} s -->",
                flush=True,
            )
            emit_row(
                "world_heads",
                backbone=name,
                head=head,
                temperature=temp,
                lr=lr,
                best_val_mAP=best,
                best_epoch=result.best_epoch,
                test=test,
                test_stricter=test_strict,
            )


if __name__ == "__main__":
    main()
