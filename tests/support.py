"""Helpers several test files share: small images of known content and synthetic data."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

RES = 32  # the tiny SD-shaped pipeline (tests/tiny_sd.py): 32 px images, 16 px latents


def drawing(seed: int, size: int = 64) -> Image.Image:
    """A small picture of random coloured shapes: distinct per seed, like clip-art."""
    rng = np.random.default_rng(seed)
    im = Image.new("RGB", (size, size), tuple(int(c) for c in rng.integers(0, 255, 3)))
    draw = ImageDraw.Draw(im)
    for _ in range(4):
        x0, y0 = rng.integers(0, size - 16, 2)
        w, h = rng.integers(8, 40, 2)
        box = [int(x0), int(y0), int(x0 + w), int(y0 + h)]
        fill = tuple(int(c) for c in rng.integers(0, 255, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
    return im


def shape_image(path: Path, kind: str, color: tuple[int, int, int]) -> Path:
    """A disc or a box of one colour on an off-white 48 x 40 canvas, saved at `path`."""
    im = Image.new("RGB", (48, 40), (240, 240, 235))
    draw = ImageDraw.Draw(im)
    if kind == "disc":
        draw.ellipse((8, 6, 38, 34), fill=color)
    else:
        draw.rectangle((6, 10, 42, 30), fill=color)
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)
    return path


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims width x height (1-bit grey) with almost no data: only the header
    says how big it is, so a check that decodes pixels first would be the one to blow up."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * 1024)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def clustered(n: int, dim: int, seed: int = 0) -> np.ndarray:
    """Vectors around 64 random centres: a gallery with structure, as real features have."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((64, dim))
    x = centers[rng.integers(0, 64, n)] + 0.4 * rng.standard_normal((n, dim))
    return x.astype(np.float32)


def normed(x) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.as_tensor(x), dim=-1)


def render(pipe, prompt: str = "a photo of <new1> dog") -> np.ndarray:
    """Three DDIM steps from a fixed noise at the tiny pipeline's resolution."""
    gen = torch.Generator().manual_seed(0)
    return pipe(
        prompt, num_inference_steps=3, generator=gen, output_type="np", height=RES, width=RES
    ).images


def make_benchmark_cmd(plan: Path, out: Path) -> list[str]:
    """`genattr make-benchmark` in a fresh interpreter (SIGKILL-able)."""
    code = "from genattr.cli import app; app()"
    return [sys.executable, "-c", code, "make-benchmark", "--plan", str(plan), "--out", str(out)]


def subprocess_env() -> dict[str, str]:
    """One thread (the same arithmetic as the tests' own), and `tests` importable."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[1]), env.get("PYTHONPATH", "")])
    return env


def bench_files(bench: Path) -> dict[str, bytes]:
    """Every file of a benchmark folder but its plan copy, by relative path."""
    skip = {"plan.json"}
    return {
        str(p.relative_to(bench)): p.read_bytes()
        for p in sorted(bench.rglob("*"))
        if p.is_file() and p.name not in skip and not p.name.startswith(".")
    }


def _same_but_times(a: bytes, b: bytes) -> bool:
    """Records agree on everything but the measured times."""
    da, db = json.loads(a), json.loads(b)
    for d in (da, db):
        for k in ("train_seconds", "sample_seconds"):
            d.pop(k, None)
    return da == db


def assert_same_benchmark(got: dict[str, bytes], want: dict[str, bytes]) -> None:
    """Two benchmark folders agree byte for byte, records but for their measured times."""
    assert set(got) == set(want)
    for name in want:
        if name.startswith("state/") or name.endswith("genattr_customize.json"):
            assert _same_but_times(got[name], want[name]), name
        else:
            assert got[name] == want[name], name  # images, weights, JSON: byte for byte


def kill_while_second_model_runs(plan: Path, bench: Path, first: str, second: str) -> None:
    """Run make-benchmark and SIGKILL it once model `first` is complete and `second` has
    started."""
    proc = subprocess.Popen(
        make_benchmark_cmd(plan, bench),
        env=subprocess_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 240
    try:
        while (
            not (bench / "state" / f"{first}.json").exists()
            or not (bench / "exemplar" / second).exists()
        ):
            assert proc.poll() is None, "make-benchmark ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL


# The files a single-concept model saves on the tiny pipeline (`train_single_models`),
# recorded with the code before multi-concept training existed (torch 2.13.0+cpu, AVX2 kernels,
# one thread). Other kernel families round their sums differently (experiments/
# kernel_family_drift.py), so the weights are compared within DRIFT_TOLERANCE of the largest
# value of each tensor. Measured on one AVX2 machine: the non-vector kernels drift 3.4e-4 (all
# three libraries switched) and 9.5e-4 (torch's alone); one training step fewer or more moves
# the worst tensor 0.11-0.12. The tolerance sits 10x above the first and 10x below the second.
RECORDED_SINGLE = Path(__file__).parent / "fixtures" / "single_concept"
DRIFT_TOLERANCE = 1e-2


def shape_images(root: Path) -> list[Path]:
    """Four exemplars: two discs and two boxes of different colours."""
    return [
        shape_image(root / "a.png", "disc", (200, 40, 30)),
        shape_image(root / "b.png", "box", (30, 60, 200)),
        shape_image(root / "c.png", "disc", (20, 160, 40)),
        shape_image(root / "d.png", "box", (230, 200, 20)),
    ]


def customize_config(**kw):
    """Custom Diffusion options for the tiny pipeline: 6 steps at 32 px, lr 2e-3."""
    from genattr.customize.config import CustomizeConfig

    base = dict(resolution=RES, max_train_steps=6, learning_rate=2e-3, initializer_token="dog")
    return CustomizeConfig(**{**base, **kw})


def train_single_models(
    tiny: Path, shapes: list[Path], out: Path, concepts: bool = False, steps: int = 6
) -> None:
    """The recorded single-concept models: an object model, then (same Customizer) a style
    model with a regularization image; `concepts` trains them with `train_concepts`."""
    from genattr.customize.config import Concept
    from genattr.customize.pipeline import load_base_pipeline
    from genattr.customize.train import Customizer

    cz = Customizer(load_base_pipeline(tiny, "cpu", "float32"))
    ex = shapes[:2]
    cfg = customize_config(max_train_steps=steps)
    if concepts:
        cz.train_concepts([Concept(ex, "object", "dog")], cfg)
    else:
        cz.train(ex, "object", "dog", cfg)
    cz.save(out / "obj")
    if concepts:
        cz.train_concepts([Concept(ex, "style")], cfg, [ex[1]], ["a photo"])
    else:
        cz.train(ex, "style", None, cfg, reg_images=[ex[1]], reg_captions=["a photo"])
    cz.save(out / "sty")


def tensors_in(path: Path) -> dict[str, torch.Tensor]:
    """A saved file's tensors (diffusers also saves empty entries for the untrained attn1)."""
    obj = torch.load(path, weights_only=True)
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def single_concept_drift(folder: Path) -> dict[str, dict[str, float]]:
    """Per saved tensor, the largest difference from the recorded model (`abs`) and the same
    over the largest recorded value of that tensor (`rel`)."""
    drift = {}
    for name in ("obj", "sty"):
        for f in sorted((RECORDED_SINGLE / name).glob("*.bin")):
            want = tensors_in(f)
            got = tensors_in(folder / name / f.name)
            assert got.keys() == want.keys(), (name, f.name)
            for k, w in want.items():
                diff = float((got[k].double() - w.double()).abs().max())
                drift[f"{name}/{f.name}/{k}"] = {
                    "abs": diff,
                    "rel": diff / float(w.double().abs().max()),
                }
    return drift


# A world base model small enough to train a few steps in a test (genattr.world.base options).
WORLD_TINY = {
    "size": 16,
    "block_out_channels": [8, 16],
    "attention_head_dim": 8,
    "text_dim": 16,
    "text_layers": 1,
    "text_heads": 2,
    "max_length": 12,
    "batch_size": 4,
    "warmup_steps": 2,
    "grid_size": 4,
    "grid_steps": 2,
}


def run_make_benchmark(plan: Path, out: Path) -> subprocess.CompletedProcess:
    """`genattr make-benchmark` to its end in a fresh interpreter; its output captured."""
    return subprocess.run(
        make_benchmark_cmd(plan, out),
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
