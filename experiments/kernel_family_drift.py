"""How far trained weights move between CPU kernel families of one torch build.

The same torch build dispatches different float kernels by CPU (torch's own AVX2 / AVX-512
paths, oneDNN, MKL); their sums round differently, so Custom Diffusion weights trained on one
machine differ in their last bits from the same run on another. This trains the recorded
single-concept models of `tests/test_customize_multiconcept.py` (tiny SD-shaped pipeline, one
thread) under whatever kernel family the environment selects and compares them with the
recorded ones in `tests/fixtures/single_concept/`, tensor by tensor: the tolerance of that test
comes from these figures. Run it once per family on one machine:

    .venv/bin/python experiments/kernel_family_drift.py
    ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=SSE41 MKL_ENABLE_INSTRUCTIONS=SSE4_2 \
        .venv/bin/python experiments/kernel_family_drift.py
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 \
        .venv/bin/python experiments/kernel_family_drift.py   # on an AVX-512 machine
    .venv/bin/python experiments/kernel_family_drift.py --steps 5  # a real change, for scale

`--record` rewrites the fixture from this family instead (it was recorded with the AVX2
kernels, where it equals the sha256 pins the test used to hold).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' recipe and pipeline
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # the harness

from harness import emit_row


def main() -> None:
    from tests.support import (
        RECORDED_SINGLE,
        shape_images,
        single_concept_drift,
        train_single_models,
    )
    from tests.tiny_sd import build_tiny_pipeline

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--record", action="store_true", help="rewrite the recorded fixture")
    ap.add_argument(
        "--steps",
        type=int,
        default=6,
        help="training steps (6 recorded; 5 shows what a real "
        "change of training does against the drift)",
    )
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tiny = build_tiny_pipeline(root / "sd")
        train_single_models(tiny, shape_images(root / "shapes"), root / "out", steps=args.steps)
        if args.record:
            for name in ("obj", "sty"):
                dst = RECORDED_SINGLE / name
                shutil.rmtree(dst, ignore_errors=True)
                dst.mkdir(parents=True)
                for f in (root / "out" / name).glob("*.bin"):
                    shutil.copyfile(f, dst / f.name)
            print(f"recorded into {RECORDED_SINGLE}")
            return
        drift = single_concept_drift(root / "out")
    report = {
        "kernels": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "steps": args.steps,
        "max_abs": max(d["abs"] for d in drift.values()),
        "max_rel": max(d["rel"] for d in drift.values()),
        "bitwise_equal": all(d["abs"] == 0 for d in drift.values()),
        "per_tensor": drift,
    }
    print(json.dumps({k: v for k, v in report.items() if k != "per_tensor"}, indent=1))
    emit_row("kernel_family_drift", **{k: v for k, v in report.items() if k != "per_tensor"})
    worst = sorted(drift.items(), key=lambda kv: -kv[1]["rel"])[:5]
    for name, d in worst:
        print(f"  {name}: abs {d['abs']:.3g}, rel {d['rel']:.3g}")


if __name__ == "__main__":
    main()
