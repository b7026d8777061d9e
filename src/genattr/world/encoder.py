"""Train the world's own feature space (`world-cnn`) on its pre-training images, resumably.

SimCLR (Chen et al., 2020): two augmented views of each image, a projection MLP, NT-Xent over
the batch. The augmentations are chosen for this world: the imprint of a customized model is
mostly colour and layout, so the views differ by a mild crop-and-shift, a horizontal flip (the
customization itself flips) and a small brightness change, never by colour jitter or grey
scale. Only `pretrain` images are used: never an exemplar or a synthesized image.

The loop runs on `accelerate` (one process on a CPU; the same code on a GPU), and
`Accelerator.save_state` checkpoints model, optimizer and random states every
`checkpoint_every` steps, so a killed run resumes where it stopped.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from genattr.atomic import write_text_atomic
from genattr.features.worldcnn import DEFAULT_WEIGHTS, WorldCNN, save_world_cnn
from genattr.progress import progress_bar
from genattr.world.clipart import ClipartData

log = logging.getLogger(__name__)


@dataclass
class EncoderConfig:
    widths: list[int] = field(default_factory=lambda: [32, 64, 128])
    grid: int = 4
    steps: int = 1500
    batch_size: int = 256
    learning_rate: float = 2e-3
    weight_decay: float = 1e-4
    temperature: float = 0.2
    projection_dim: int = 128
    min_scale: float = 0.6  # of the image side kept by a crop
    brightness: float = 0.1
    seed: int = 0
    checkpoint_every: int = 250


class SimCLR(nn.Module):
    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.encoder = WorldCNN(cfg.widths, cfg.grid)
        self.projection = nn.Sequential(
            nn.Linear(self.encoder.dim, 512), nn.ReLU(), nn.Linear(512, cfg.projection_dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.projection(self.encoder(x)), dim=1)


def augment(x: torch.Tensor, cfg: EncoderConfig, gen: torch.Generator) -> torch.Tensor:
    """A random view of each image of (B, 3, S, S) in [-1, 1]: crop-and-shift (an affine
    resampling; the border is the clip-art's white), horizontal flip, brightness."""
    b = len(x)
    scale = cfg.min_scale + (1 - cfg.min_scale) * torch.rand(b, generator=gen)
    shift = (1 - scale)[:, None] * (2 * torch.rand(b, 2, generator=gen) - 1)
    flip = torch.where(torch.rand(b, generator=gen) < 0.5, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1] = scale * flip, scale
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    gain = 1 + cfg.brightness * (2 * torch.rand(b, 1, 1, 1, generator=gen) - 1)
    return ((out + 1) * gain - 1).clamp(-1, 1)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's loss: each view must pick its partner out of the 2B - 1 other views."""
    z = torch.cat([z1, z2])
    sim = z @ z.T / temperature
    sim.fill_diagonal_(-torch.inf)
    b = len(z1)
    target = torch.cat([torch.arange(b, 2 * b), torch.arange(b)])
    return F.cross_entropy(sim, target)


def _lr_factor(step: int, total: int, warmup: int = 100) -> float:
    """Linear warm-up, then cosine decay to zero at `total`."""
    return (
        min(1.0, (step + 1) / warmup) * 0.5 * (1 + float(np.cos(np.pi * min(step, total) / total)))
    )


def _checkpoints(run: Path) -> list[Path]:
    folders = [p for p in run.glob("checkpoints/step-*") if p.is_dir()]
    return sorted(folders, key=lambda p: int(p.name.split("-")[1]))


def train_encoder(
    data: ClipartData,
    run: str | os.PathLike,
    cfg: EncoderConfig | None = None,
    out: str | os.PathLike | None = None,
    max_steps: int | None = None,
) -> Path:
    """Train (or resume) in `run`; when `cfg.steps` are done, write the encoder's weights to
    `out` (default: `run/world-cnn32.safetensors`) and return that path. `max_steps` stops
    this call early (with a checkpoint), for a run split over several calls."""
    from accelerate import Accelerator

    run = Path(run)
    run.mkdir(parents=True, exist_ok=True)
    cfg_path = run / "encoder.json"
    if cfg_path.is_file():
        saved = EncoderConfig(**json.loads(cfg_path.read_text()))
        if cfg is not None and asdict(cfg) != asdict(saved):
            log.warning("%s: resuming with the run's own settings, not the ones passed", run)
        cfg = saved
    cfg = cfg or EncoderConfig()
    write_text_atomic(cfg_path, json.dumps(asdict(cfg), indent=1))

    torch.manual_seed(cfg.seed)
    images = data.images[data.indices("pretrain")]
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    model = SimCLR(cfg)
    opt = torch.optim.AdamW(model.parameters(), cfg.learning_rate, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, cfg.steps))
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    model, opt, sched = accelerator.prepare(model, opt, sched)
    step = 0
    done = _checkpoints(run)
    if done:
        accelerator.load_state(str(done[-1]))
        step = int(done[-1].name.split("-")[1])
        log.info("resumed %s at step %d", run, step)
    stop = cfg.steps if max_steps is None else min(cfg.steps, step + max_steps)
    model.train()
    losses: list[float] = []
    with progress_bar("world-cnn", cfg.steps, done=step, unit="step") as advance:
        while step < stop:
            gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
            idx = torch.randperm(len(pixels), generator=gen)[: cfg.batch_size]
            x = pixels[idx]
            views = [augment(x, cfg, gen).to(accelerator.device) for _ in range(2)]
            loss = nt_xent(model(views[0]), model(views[1]), cfg.temperature)
            opt.zero_grad()
            accelerator.backward(loss)
            opt.step()
            sched.step()
            step += 1
            losses.append(float(loss.detach()))
            advance(1)
            if step % cfg.checkpoint_every == 0 or step == stop:
                _checkpoint(accelerator, run, step, losses)
                losses = []
    if step < cfg.steps:
        return run
    encoder = accelerator.unwrap_model(model).encoder.eval()
    out = Path(out) if out is not None else run / DEFAULT_WEIGHTS.name
    history = [json.loads(p.read_text()) for p in sorted(run.glob("checkpoints/*.json"))]
    save_world_cnn(encoder, out, {"config": asdict(cfg), "loss": history})
    return out


def _checkpoint(accelerator, run: Path, step: int, losses: list[float]) -> None:
    """Save the state into a temporary folder and rename it into place; keep the newest two."""
    tmp = run / "checkpoints" / f".tmp-step-{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    accelerator.save_state(str(tmp))
    final = run / "checkpoints" / f"step-{step:07d}"
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    write_text_atomic(
        run / "checkpoints" / f"step-{step:07d}.json",
        json.dumps({"step": step, "mean_loss": float(np.mean(losses)) if losses else None}),
    )
    log.info("step %d: loss %.4f", step, float(np.mean(losses)) if losses else float("nan"))
    for old in _checkpoints(run)[:-2]:
        shutil.rmtree(old, ignore_errors=True)
