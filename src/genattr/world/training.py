"""Training the miniature world's base model: resumable (checkpoints written atomically, the
newest two kept; a resumed run equals one never stopped on the same machine), options that
may change on resume recorded with their step, and the run's record beside the weights."""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from genattr.atomic import atomic_path
from genattr.customize.pipeline import prompt_ids
from genattr.errors import GenattrError
from genattr.world.base import (
    _ABSENT_MEANS,
    BASE_FORMAT_VERSION,
    CONFIG_NAME,
    STATE_NAME,
    TRAINING_NAME,
    TRAINING_OPTIONS,
    BaseConfig,
    base_model_dir,
    build_models,
    image_grid,
    make_pipeline,
    make_scheduler,
    sample,
)
from genattr.world.clipart import DEFAULT_DATA_DIR, load_data
from genattr.world.tokenizer import build_tokenizer

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import (
        StableDiffusionPipeline,
    )


@dataclass
class TrainReport:
    step: int
    resumed_from: int | None
    seconds: float
    steps_per_second: float
    losses: list[float] = field(default_factory=list)
    checkpoints: list[Path] = field(default_factory=list)


def list_checkpoints(out: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    d = Path(out) / "checkpoints"
    if not d.is_dir():
        return []
    return sorted(p for p in d.glob("step-*") if (p / STATE_NAME).is_file() and p.is_dir())


def _with(cfg: BaseConfig, changes: dict[str, Any] | None) -> BaseConfig:
    return BaseConfig.from_dict({**asdict(cfg), **changes}) if changes else cfg


def _changes(old: BaseConfig, new: BaseConfig) -> dict[str, Any]:
    a, b = asdict(old), asdict(new)
    return {k: b[k] for k in a if a[k] != b[k]}


def loss_weights(scheduler: Any, t: torch.Tensor, snr_gamma: float | None) -> torch.Tensor:
    """Per-image loss weights: min(SNR, gamma) / SNR for noise prediction, min(SNR, gamma) /
    (SNR + 1) for v (the same weight on the implied image error), or ones."""
    if snr_gamma is None:
        return torch.ones(len(t))
    alpha_bar = scheduler.alphas_cumprod[t].to(torch.float32)
    snr = alpha_bar / (1 - alpha_bar)
    v = scheduler.config.prediction_type == "v_prediction"
    return torch.clamp(snr, max=snr_gamma) / (snr + 1 if v else snr)


def _lr_at(cfg: BaseConfig, step: int) -> float:
    # Constant after warm-up, so a run can be extended by any number of steps and resumed.
    return cfg.learning_rate * min(1.0, (step + 1) / max(1, cfg.warmup_steps))


class BaseTrainer:
    """One training run in `out`: builds or resumes the state, trains, checkpoints."""

    def __init__(
        self,
        out: str | os.PathLike,
        images: np.ndarray,
        captions: Sequence[str],
        config: BaseConfig | None = None,
        tokenizer: Any = None,
        changes: dict[str, Any] | None = None,
    ) -> None:
        """`changes`: options to set on top of `config` (or of the run's own config when
        resuming; only `TRAINING_OPTIONS` may change then, from the resumed step on)."""
        import transformers

        transformers.logging.set_verbosity_error()
        self.out = Path(out)
        self.images = images
        self.captions = list(captions)
        if len(self.images) != len(self.captions) or not len(self.captions):
            raise GenattrError("need one caption per image, and at least one image")
        saved = self.out / CONFIG_NAME
        self.history: list[dict[str, Any]] = []
        record = json.loads(saved.read_text()) if saved.is_file() else None
        self.cfg = self._settle_config(record, config, changes)
        self.tokenizer = self._find_tokenizer(tokenizer)
        self._build_model()
        self._start_streams()
        # Token ids of every caption and of the empty prompt, once.
        self.ids = self._tokenize(self.captions)
        self.empty_ids = self._tokenize([""])[0]
        if record is None:
            self._start_run()

    def _settle_config(
        self,
        record: dict[str, Any] | None,
        config: BaseConfig | None,
        changes: dict[str, Any] | None,
    ) -> BaseConfig:
        """The run's config: a new run's is `config` with `changes`; a resumed run keeps its
        own and queues the changes (training options only) for `resume`."""
        if record is None:
            return _with(config or BaseConfig(), changes)
        old = BaseConfig.from_dict({**_ABSENT_MEANS, **record["config"]})
        self.history = list(record.get("history", []))
        changed = _changes(old, _with(config or old, changes))
        if set(changed) - TRAINING_OPTIONS:
            raise GenattrError(f"{self.out} was started with another config: {asdict(old)}")
        self._pending: dict[str, Any] = changed
        return old

    def _find_tokenizer(self, tokenizer: Any) -> Any:
        """The tokenizer given, else the run's saved one, else one built from the captions."""
        if tokenizer is not None:
            return tokenizer
        tok_dir = self.out / "tokenizer"
        if tok_dir.is_dir():
            from transformers import CLIPTokenizer

            return CLIPTokenizer.from_pretrained(str(tok_dir))
        return build_tokenizer(self.captions, self.cfg.max_length, self.cfg.min_word_count)

    def _build_model(self) -> None:
        """Fresh seeded networks, their EMA copy and the optimizer (`resume` loads saved ones)."""
        self.unet, self.text_encoder = build_models(self.cfg, self.tokenizer)
        if self.cfg.channels_last:
            self.unet.to(memory_format=torch.channels_last)
        self.ema = {k: v.detach().clone() for k, v in self._named_params()}
        self.opt = torch.optim.AdamW(
            [p for _, p in self._named_params()],
            lr=self.cfg.learning_rate,
            weight_decay=self.cfg.weight_decay,
        )

    def _start_streams(self) -> None:
        """Step 0: seeded random streams, no losses yet, the configured noise schedule."""
        self.rng = np.random.default_rng(self.cfg.seed)
        self.gen = torch.Generator().manual_seed(self.cfg.seed)
        self.step = 0
        self.losses: list[float] = []
        self.noise = make_scheduler(self.cfg.prediction_type)

    def _start_run(self) -> None:
        """A new run's folder: its tokenizer and its record (no changes pending)."""
        self.out.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(str(self.out / "tokenizer"))
        self._pending = {}
        self._write_record()

    def _write_record(self) -> None:
        with atomic_path(self.out / CONFIG_NAME) as tmp:
            tmp.write_text(
                json.dumps(
                    {
                        "kind": "genattr.world.base",
                        "format_version": BASE_FORMAT_VERSION,
                        "config": asdict(self.cfg),
                        "images": len(self.captions),
                        "history": self.history,
                    },
                    indent=1,
                )
            )

    def _apply_pending(self) -> None:
        """Training options changed by this resume take effect from the current step on."""
        if not self._pending:
            return
        before = asdict(self.cfg)
        self.cfg = BaseConfig.from_dict({**before, **self._pending})
        self.noise = make_scheduler(self.cfg.prediction_type)
        self.history.append(
            {"step": self.step, "changed": {k: [before[k], v] for k, v in self._pending.items()}}
        )
        self._pending = {}
        self._write_record()

    def _tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return prompt_ids(self.tokenizer, texts, self.cfg.max_length)

    def _named_params(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [(f"unet.{k}", v) for k, v in self.unet.named_parameters()] + [
            (f"text_encoder.{k}", v) for k, v in self.text_encoder.named_parameters()
        ]

    # -- state ---------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "format_version": BASE_FORMAT_VERSION,
            "step": self.step,
            "unet": self.unet.state_dict(),
            "text_encoder": self.text_encoder.state_dict(),
            "ema": self.ema,
            "optimizer": self.opt.state_dict(),
            "numpy_rng": self.rng.bit_generator.state,
            "torch_gen": self.gen.get_state(),
            "losses": self.losses,
        }

    def load_state(self, path: Path) -> None:
        st = torch.load(path / STATE_NAME, map_location="cpu", weights_only=True)
        self.unet.load_state_dict(st["unet"])
        self.text_encoder.load_state_dict(st["text_encoder"])
        self.ema = st["ema"]
        self.opt.load_state_dict(st["optimizer"])
        self.rng.bit_generator.state = st["numpy_rng"]
        self.gen.set_state(st["torch_gen"])
        self.step = int(st["step"])
        self.losses = list(st["losses"])

    def resume(self) -> int | None:
        """Load the newest complete checkpoint; its step, or None for a fresh run."""
        ckpts = list_checkpoints(self.out)
        if ckpts:
            self.load_state(ckpts[-1])
        self._apply_pending()
        return self.step if ckpts else None

    def checkpoint(self, keep: int = 2, grid: bool = True) -> Path:
        """Write the state (atomically: a temporary folder renamed into place) and a grid."""
        final = self.out / "checkpoints" / f"step-{self.step:07d}"
        tmp = self.out / "checkpoints" / f".tmp-step-{self.step:07d}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        torch.save(self.state(), tmp / STATE_NAME)
        if grid:
            self.sample_grid().save(tmp / "grid.png")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in list_checkpoints(self.out)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    # -- training ------------------------------------------------------------------------
    def train_step(self) -> float:
        cfg = self.cfg
        idx = self.rng.integers(0, len(self.images), cfg.batch_size)
        x = self.images[idx].astype(np.float32) / 127.5 - 1.0
        if cfg.hflip:
            flip = self.rng.random(cfg.batch_size) < 0.5
            x[flip] = x[flip, :, ::-1]
        drop = self.rng.random(cfg.batch_size) < cfg.caption_dropout
        ids = self.ids[idx].clone()
        ids[torch.from_numpy(drop)] = self.empty_ids
        x0 = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2)
        noise = torch.randn(x0.shape, generator=self.gen)
        t = torch.randint(0, 1000, (cfg.batch_size,), generator=self.gen)
        noisy = self.noise.add_noise(x0, noise, t)
        for g in self.opt.param_groups:
            g["lr"] = _lr_at(cfg, self.step)
        self.unet.train()
        self.text_encoder.train()
        cond = self.text_encoder(ids)[0]
        pred = self.unet(noisy, t, cond).sample
        target = (
            noise if cfg.prediction_type == "epsilon" else self.noise.get_velocity(x0, noise, t)
        )
        per_image = F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))
        loss = (loss_weights(self.noise, t, cfg.snr_gamma) * per_image).mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in self._named_params()], 1.0)
        self.opt.step()
        with torch.no_grad():
            d = min(cfg.ema_decay, (1 + self.step) / (10 + self.step))
            for k, p in self._named_params():
                self.ema[k].mul_(d).add_(p.detach(), alpha=1 - d)
        self.step += 1
        value = float(loss.detach())
        self.losses.append(value)
        return value

    def train(
        self,
        steps: int,
        checkpoint_seconds: float = 300.0,
        checkpoint_every: int | None = None,
        max_seconds: float | None = None,
        grid: bool = True,
    ) -> TrainReport:
        """Train until `steps` (total, counting resumed ones) or `max_seconds`; checkpoint on
        the interval and at the end."""
        resumed = self.resume()
        if resumed is not None:
            logger.info("resumed from step %d", resumed)
        start_step = self.step
        t0 = last = time.perf_counter()
        written: list[Path] = []
        while self.step < steps:
            loss = self.train_step()
            now = time.perf_counter()
            due = (checkpoint_every and self.step % checkpoint_every == 0) or (
                now - last >= checkpoint_seconds
            )
            if max_seconds is not None and now - t0 >= max_seconds:
                break
            if due and self.step < steps:
                written.append(self.checkpoint(grid=grid))
                last = time.perf_counter()
                rate = (self.step - start_step) / (last - t0)
                logger.info(
                    "step %d loss %.4f (%.2f steps/s) -> %s", self.step, loss, rate, written[-1]
                )
        seconds = time.perf_counter() - t0
        if not written or written[-1].name != f"step-{self.step:07d}":
            written.append(self.checkpoint(grid=grid))
        rate = (self.step - start_step) / seconds if seconds > 0 else 0.0
        return TrainReport(self.step, resumed, seconds, rate, self.losses, written)

    # -- the model -----------------------------------------------------------------------
    def pipeline(self, ema: bool = True) -> StableDiffusionPipeline:
        """The current model (EMA weights by default) as a pipeline; copies, so training goes
        on unaffected."""
        unet, te = copy.deepcopy(self.unet), copy.deepcopy(self.text_encoder)
        if ema:
            unet.load_state_dict(
                {k[5:]: v for k, v in self.ema.items() if k.startswith("unet.")}, strict=False
            )
            te.load_state_dict(
                {k[13:]: v for k, v in self.ema.items() if k.startswith("text_encoder.")},
                strict=False,
            )
        unet.eval()
        te.eval()
        return make_pipeline(unet, te, self.tokenizer, self.cfg.prediction_type)

    def sample_grid(self, prompts: Sequence[str] | None = None) -> Any:
        """A grid of EMA samples for fixed captions (the same ones at every checkpoint)."""
        n = self.cfg.grid_size
        if prompts is None:
            pick = np.random.default_rng(1234).permutation(len(self.captions))[:n]
            prompts = [self.captions[i] for i in pick]
        images = sample(self.pipeline(), prompts, self.cfg.grid_steps, self.cfg.grid_guidance)
        return image_grid(images, cols=8)

    def save_pipeline(self, path: str | os.PathLike, half: bool = False) -> Path:
        """The EMA model as a `from_pretrained`-loadable pipeline folder (`half`: fp16 weights,
        half the size, for shipping; loading in fp32 upcasts them) with `training.json`."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        pipe = self.pipeline()
        if half:
            pipe = pipe.to(torch.float16)
        pipe.save_pretrained(str(tmp), safe_serialization=True)
        every = max(1, len(self.losses) // 200)
        curve = [
            [i + every, float(np.mean(self.losses[i : i + every]))]
            for i in range(0, len(self.losses) - every + 1, every)
        ]
        (tmp / TRAINING_NAME).write_text(
            json.dumps(
                {
                    "config": asdict(self.cfg),
                    "step": self.step,
                    "history": self.history,
                    "loss_curve": curve,
                },
                indent=1,
            )
        )
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
        return path


def train_base(
    out: str | os.PathLike,
    data_dir: str | os.PathLike | None = None,
    steps: int = 20000,
    config: BaseConfig | None = None,
    checkpoint_seconds: float = 300.0,
    *,
    max_seconds: float | None = None,
    changes: dict[str, Any] | None = None,
) -> TrainReport:
    """Train (or resume) the world's base model on the pretrain split; then write the EMA
    pipeline to `out/pipeline`. `changes`: training options to change from here on."""
    data = load_data(data_dir or DEFAULT_DATA_DIR, size=(config or BaseConfig()).size)
    idx = data.indices("pretrain")
    trainer = BaseTrainer(out, data.images[idx], data.captions(idx), config, changes=changes)
    report = trainer.train(steps, checkpoint_seconds, max_seconds=max_seconds)
    trainer.save_pipeline(Path(out) / "pipeline")
    return report


def export_base(
    run: str | os.PathLike,
    out: str | os.PathLike | None = None,
    data_dir: str | os.PathLike | None = None,
) -> Path:
    """A run's newest checkpoint (EMA weights, fp16) as the world's shipped base model."""
    saved = Path(run) / CONFIG_NAME
    if not saved.is_file():
        raise GenattrError(f"{run}: not a base-model run (no {CONFIG_NAME})")
    cfg = BaseConfig.from_dict({**_ABSENT_MEANS, **json.loads(saved.read_text())["config"]})
    data = load_data(data_dir or DEFAULT_DATA_DIR, size=cfg.size)
    idx = data.indices("pretrain")
    trainer = BaseTrainer(run, data.images[idx], data.captions(idx), cfg)
    if trainer.resume() is None:
        raise GenattrError(f"{run}: no checkpoint to export")
    return trainer.save_pipeline(out or base_model_dir(cfg.size), half=True)
