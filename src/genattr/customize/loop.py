"""Custom Diffusion's training loop, apart from the model it trains (`Customizer`): examples
drawn in a shuffled cycle (regularization images beside them), one optimizer step per batch,
the masked noise-prediction loss with its prior term."""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from genattr.customize.config import CustomizeConfig
from genattr.customize.examples import augment_example, open_training_image, plain_example
from genattr.customize.pipeline import prompt_ids

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import (
        StableDiffusionPipeline,
    )


def detach_first_token(module, inputs, output):
    """Custom Diffusion leaves the start-of-text token's key/value out of the gradient."""
    return torch.cat([output[:, :1].detach(), output[:, 1:]], dim=1)


class _Cycler:
    """Indices in shuffled passes, so every exemplar is seen equally often."""

    def __init__(self, n: int, rng: np.random.Generator) -> None:
        self.n, self.rng = n, rng
        self.queue: list[int] = []

    def take(self, k: int) -> list[int]:
        out: list[int] = []
        while len(out) < k:
            if not self.queue:
                self.queue = list(self.rng.permutation(self.n))
            out.append(int(self.queue.pop()))
        return out


@dataclass
class _Batch:
    """One step's examples: images (HWC, [-1, 1]), loss masks and prompts, the first `n_inst`
    of them exemplars, the rest regularization images."""

    pix: list[np.ndarray]
    masks: list[np.ndarray]
    prompts: list[str]
    n_inst: int


class Batches:
    """Each step's examples, drawn from one random stream: augmented exemplars (of all
    concepts, each with its concept's prompt) in shuffled passes, then as many plain
    regularization images. `draws` counts the exemplars drawn per concept."""

    def __init__(
        self,
        images: list[Image.Image],
        prompts: list[str],
        reg: tuple[list[Path], list[str]] | None,
        cfg: CustomizeConfig,
        latent_size: int,
        rng: np.random.Generator,
        owner: list[int],
    ) -> None:
        self.images, self.prompts, self.reg, self.cfg = images, prompts, reg, cfg
        self.latent_size, self.rng, self.owner = latent_size, rng, owner
        self.order = _Cycler(len(images), rng)
        self.reg_order = _Cycler(len(reg[0]), rng) if reg else None
        self.draws = [0] * (max(owner) + 1)

    def next(self) -> _Batch:
        """The next step's batch (exemplars first)."""
        cfg, size, latent_size = self.cfg, self.cfg.resolution, self.latent_size
        pix, masks, prompts = [], [], []
        for i in self.order.take(cfg.train_batch_size):
            example, example_mask, prefix = augment_example(
                self.images[i], size, latent_size, self.rng, hflip=cfg.hflip, augment=cfg.augment
            )
            pix.append(example)
            masks.append(example_mask)
            prompts.append(prefix + self.prompts[i])
            self.draws[self.owner[i]] += 1
        n_inst = len(pix)
        if self.reg is not None and self.reg_order is not None:
            for i in self.reg_order.take(cfg.train_batch_size):
                pix.append(plain_example(open_training_image(self.reg[0][i]), size))
                masks.append(np.ones((latent_size, latent_size), np.float32))
                prompts.append(self.reg[1][i])
        return _Batch(pix, masks, prompts, n_inst)


class Step:
    """One optimizer step of Custom Diffusion: encode a batch, noise it, predict, take the
    masked loss, update (with fp16 loss scaling and gradient clipping)."""

    def __init__(
        self,
        pipe: StableDiffusionPipeline,
        params: list[torch.Tensor],
        lr: float,
        cfg: CustomizeConfig,
        gen: torch.Generator,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        from diffusers import DDPMScheduler

        self.pipe, self.params, self.cfg, self.gen = pipe, params, cfg, gen
        self.device, self.dtype = device, dtype
        self.noise_sched = DDPMScheduler.from_config(pipe.scheduler.config)
        self.opt = torch.optim.AdamW(
            params,
            lr=lr,
            betas=(cfg.adam_beta1, cfg.adam_beta2),
            weight_decay=cfg.adam_weight_decay,
            eps=cfg.adam_epsilon,
        )
        self.autocast = (
            torch.autocast(device_type=device.type, dtype=dtype)
            if dtype != torch.float32
            else contextlib.nullcontext()
        )
        self.scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    def __call__(self, batch: _Batch) -> float:
        """Train on `batch`; its loss."""
        x, mask, ids = self._tensors(batch)
        noisy, t, target = self._noised(x)
        with self.autocast:
            cond = self.pipe.text_encoder(ids)[0]
            pred = self.pipe.unet(noisy, t, cond).sample
        loss = self._loss(pred, target, mask, batch.n_inst, len(batch.pix))
        self._update(loss)
        return float(loss.detach())

    def _tensors(self, batch: _Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The batch as model inputs: images (NCHW), loss masks (N1HW), prompt token ids."""
        tok, device = self.pipe.tokenizer, self.device
        x = torch.from_numpy(np.stack(batch.pix)).permute(0, 3, 1, 2).to(device, self.dtype)
        mask = torch.from_numpy(np.stack(batch.masks))[:, None].to(device)
        ids = prompt_ids(tok, batch.prompts).to(device)
        return x, mask, ids

    def _noised(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Diffusion's forward process on the images' latents: the noisy latents, timesteps
        and the UNet's target (latents, noise, timesteps drawn in that order)."""
        vae, noise_sched, gen = self.pipe.vae, self.noise_sched, self.gen
        with torch.no_grad():
            latents = vae.encode(x).latent_dist.sample(generator=gen)
            latents = latents * vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=gen, device=self.device, dtype=latents.dtype)
        t = torch.randint(
            0,
            noise_sched.config.num_train_timesteps,
            (latents.shape[0],),
            generator=gen,
            device=self.device,
        ).long()
        noisy = noise_sched.add_noise(latents, noise, t)
        if noise_sched.config.prediction_type == "v_prediction":
            target = noise_sched.get_velocity(latents, noise, t)
        else:
            target = noise
        return noisy, t, target

    def _loss(
        self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, n_inst: int, n: int
    ) -> torch.Tensor:
        """The masked exemplar loss plus the weighted prior loss on regularization images."""
        err = F.mse_loss(pred.float(), target.float(), reduction="none")
        # As diffusers' script: summed over latent channels, averaged over masked
        # pixels (so this term weighs 4x a plain mean next to the prior loss).
        inst = err[:n_inst] * mask[:n_inst]
        loss = (inst.sum((1, 2, 3)) / mask[:n_inst].sum((1, 2, 3))).mean()
        if n_inst < n:
            loss = loss + self.cfg.prior_loss_weight * err[n_inst:].mean()
        return loss

    def _update(self, loss: torch.Tensor) -> None:
        """Backpropagate `loss` (scaled for fp16), clip the gradients, step the optimizer."""
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.opt)
        torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        self.scaler.step(self.opt)
        self.scaler.update()


def optimize(step: Step, batches: Batches, steps: int) -> list[float]:
    """`steps` training steps, logging the loss ten times along the way; the losses."""
    losses: list[float] = []
    for i in range(steps):
        losses.append(step(batches.next()))
        if (i + 1) % max(1, steps // 10) == 0:
            logger.info("  step %d/%d loss %.4f", i + 1, steps, losses[-1])
    return losses


def seconds_since(t0: float, device: torch.device) -> float:
    """Seconds since `t0` (`time.perf_counter`), once the GPU's queued work has finished."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0
