"""Custom Diffusion training (Kumari et al. 2023) as the AbC benchmark uses it.

Trainable: the embedding of one new modifier token and the key/value projections (`to_k`,
`to_v`) of every cross-attention layer of the UNet; everything else stays frozen. The token's
row is a separate parameter spliced into the embedding output, so no other row of the
embedding matrix can move (AdamW's weight decay would otherwise shrink them all). As in Custom
Diffusion, the keys and values of the first text token (start-of-text) get no gradient.

Saved in diffusers' Custom Diffusion format (`pytorch_custom_diffusion_weights.bin`,
`<new1>.bin`) plus `genattr_customize.json`, which records how the model was made.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from pydantic import Field

from genattr.atomic import atomic_path
from genattr.customize.pipeline import load_base_pipeline
from genattr.errors import GenattrError
from genattr.options import options_from_mapping

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import (
        StableDiffusionPipeline,
    )

WEIGHTS_NAME = "pytorch_custom_diffusion_weights.bin"
INFO_NAME = "genattr_customize.json"
CUSTOMIZE_FORMAT_VERSION = 1
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
_SMALL_PREFIXES = ("a far away ", "very small ")
_LARGE_PREFIXES = ("zoomed in ", "close up ")


@dataclass
class CustomizeConfig:
    """Custom Diffusion's defaults (diffusers `train_custom_diffusion.py` and its README)."""

    modifier_token: str = "<new1>"
    initializer_token: str = "ktn"  # a rare CLIP token, Custom Diffusion's default
    learning_rate: Annotated[float, Field(gt=0)] = 1e-5
    scale_lr: bool = True  # lr x batch size (x2 with regularisation), as `--scale_lr`
    train_batch_size: Annotated[int, Field(ge=1)] = 2
    max_train_steps: Annotated[int, Field(ge=1)] = 250
    resolution: Annotated[int, Field(ge=8)] = 512
    hflip: bool = True
    augment: bool = True  # random rescale with a loss mask and "far away"/"close up" prompts
    prior_loss_weight: Annotated[float, Field(ge=0)] = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_grad_norm: Annotated[float, Field(gt=0)] = 1.0
    seed: int = 42
    gradient_checkpointing: bool = False  # less GPU memory for about 30% more time

    def effective_lr(self, with_prior: bool) -> float:
        if not self.scale_lr:
            return self.learning_rate
        return self.learning_rate * self.train_batch_size * (2.0 if with_prior else 1.0)


def config_from_dict(values: dict[str, Any] | None) -> CustomizeConfig:
    """A config from a plan's `train:` mapping; unknown keys and ill-typed values are errors."""
    return options_from_mapping(CustomizeConfig, values, "training")


def training_prompt(mode: str, category: str | None, token: str = "<new1>") -> str:
    """The authors' training prompts: '<new1> {category}' (objects), a style sentence (styles)."""
    if mode == "object":
        if not category:
            raise GenattrError(
                f"object models need a --category (the training prompt is '{token} CATEGORY')"
            )
        return f"{token} {category}"
    if mode == "style":
        return f"A picture in the style of {token} art"
    raise GenattrError(f"mode must be 'object' or 'style', not {mode!r}")


def list_images(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Image files from paths and folders (a folder gives its images in name order)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise GenattrError(f"{p}: folder has no images")
            out.extend(found)
        elif p.is_file():
            out.append(p)
        else:
            raise GenattrError(f"{p}: no such file or folder")
    if not out:
        raise GenattrError("no exemplar images given")
    return out


def _open_rgb(path: Path) -> Image.Image:
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, UnidentifiedImageError) as e:
        raise GenattrError(f"{path}: not a readable image ({e})") from None


def check_image(path: Path) -> None:
    """Raise a GenattrError naming the file unless it is a readable image (header check)."""
    try:
        with Image.open(path) as im:
            im.verify()
    except (OSError, UnidentifiedImageError, SyntaxError) as e:
        raise GenattrError(f"{path}: not a readable image ({e})") from None


def _square(im: Image.Image) -> Image.Image:
    w, h = im.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    return im.crop((left, top, left + s, top + s))


def _to_array(im: Image.Image) -> np.ndarray:
    return np.asarray(im, dtype=np.float32) / 127.5 - 1.0


def augment_example(
    im: Image.Image,
    size: int,
    latent_size: int,
    rng: np.random.Generator,
    hflip: bool,
    augment: bool,
) -> tuple[np.ndarray, np.ndarray, str]:
    """Custom Diffusion's augmentation: the exemplar rescaled to a random size and either placed
    on a blank canvas (small) or cropped (large). Returns the image (HWC, [-1, 1]), the loss mask
    at latent resolution (only where the image is) and the prompt prefix that names the scale."""
    im = _square(im)
    if hflip and rng.random() < 0.5:
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    scale = size
    if augment:
        if rng.random() < 0.66:
            scale = int(rng.integers(size // 3, size + 1))
        else:
            scale = int(rng.integers(int(1.2 * size), int(1.4 * size)))
    arr = _to_array(im.resize((scale, scale), Image.Resampling.BILINEAR))
    factor = size // latent_size
    if scale >= size:
        top, left = (int(rng.integers(0, scale - size + 1)) for _ in range(2))
        image = arr[top : top + size, left : left + size]
        mask = np.ones((latent_size, latent_size), np.float32)
    else:
        top, left = (int(rng.integers(0, size - scale + 1)) for _ in range(2))
        image = np.zeros((size, size, 3), np.float32)
        image[top : top + scale, left : left + scale] = arr
        mask = np.zeros((latent_size, latent_size), np.float32)
        # One latent pixel in from the border: the edge of the pasted image is blurred by the VAE.
        mask[
            top // factor + 1 : (top + scale) // factor - 1,
            left // factor + 1 : (left + scale) // factor - 1,
        ] = 1.0
        if not mask.any():
            mask[
                top // factor : (top + scale) // factor + 1,
                left // factor : (left + scale) // factor + 1,
            ] = 1.0
    prefix = ""
    if scale < 0.6 * size:
        prefix = _SMALL_PREFIXES[int(rng.integers(0, 2))]
    elif scale > size:
        prefix = _LARGE_PREFIXES[int(rng.integers(0, 2))]
    return image, mask, prefix


def _plain_example(im: Image.Image, size: int) -> np.ndarray:
    return _to_array(_square(im).resize((size, size), Image.Resampling.BILINEAR))


@dataclass
class TrainStats:
    steps: int
    seconds: float
    final_loss: float
    losses: list[float] = field(default_factory=list)

    @property
    def steps_per_second(self) -> float:
        return self.steps / self.seconds if self.seconds > 0 else math.inf


def cross_attention_layers(unet: Any) -> dict[str, Any]:
    """Processor name -> Attention module, for every cross-attention layer (SD's `attn2`)."""
    from diffusers.models.attention_processor import Attention

    return {
        f"{name}.processor": m
        for name, m in unet.named_modules()
        if isinstance(m, Attention) and m.is_cross_attention
    }


class Customizer:
    """Custom Diffusion on one loaded pipeline, reusable model after model: `train` changes the
    pipeline in place, `save` writes the model, `reset` restores the base weights exactly."""

    def __init__(self, pipe: StableDiffusionPipeline) -> None:
        self.pipe = pipe
        self.layers = cross_attention_layers(pipe.unet)
        if not self.layers:
            raise GenattrError("the base UNet has no cross-attention layers to customize")
        self._base_kv = {
            name: (m.to_k.weight.detach().clone(), m.to_v.weight.detach().clone())
            for name, m in self.layers.items()
        }
        self.token: str | None = None
        self.token_id: int | None = None
        self.initializer: str | None = None
        self.prompt: str | None = None

    # -- the modifier token -------------------------------------------------------------
    def _add_token(self, token: str, initializer: str) -> torch.Tensor:
        """Make `token` one id of the tokenizer (added once per pipeline) and return the
        embedding it starts from: the initializer's (mean of its pieces if it is several)."""
        tok, te = self.pipe.tokenizer, self.pipe.text_encoder
        if self.token is None:
            if tok.convert_tokens_to_ids(token) not in (None, tok.unk_token_id):
                raise GenattrError(f"the tokenizer already has {token!r}; pick another token")
            tok.add_tokens(token)
            te.resize_token_embeddings(len(tok), mean_resizing=False)
            self.token, self.token_id = token, tok.convert_tokens_to_ids(token)
        elif token != self.token:
            raise GenattrError(f"this pipeline was customized with {self.token!r}, not {token!r}")
        init_ids = tok.encode(initializer, add_special_tokens=False)
        if not init_ids:
            raise GenattrError(f"initializer token {initializer!r} encodes to nothing")
        emb = te.get_input_embeddings().weight
        with torch.no_grad():
            return emb[torch.tensor(init_ids, device=emb.device)].float().mean(0)

    # -- training -----------------------------------------------------------------------
    def train(
        self,
        exemplars: Sequence[str | os.PathLike],
        mode: str,
        category: str | None = None,
        config: CustomizeConfig | None = None,
        reg_images: Sequence[str | os.PathLike] | None = None,
        reg_captions: Sequence[str] | None = None,
    ) -> TrainStats:
        """Tune the pipeline toward the exemplars (in place); returns timing and losses."""
        from diffusers import DDPMScheduler

        cfg = config or CustomizeConfig()
        pipe = self.pipe
        unet, vae, te, tok = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
        device, dtype = unet.device, unet.dtype
        prompt = training_prompt(mode, category, cfg.modifier_token)
        images = [_open_rgb(p) for p in list_images(exemplars)]
        reg = _reg_set(reg_images, reg_captions)

        self.reset()
        init = self._add_token(cfg.modifier_token, cfg.initializer_token)
        self.initializer, self.prompt = cfg.initializer_token, prompt

        size = cfg.resolution
        latent_size = size // pipe.vae_scale_factor
        if latent_size * pipe.vae_scale_factor != size or latent_size < 3:
            raise GenattrError(
                f"resolution {size} must be a multiple of the VAE factor {pipe.vae_scale_factor}"
            )
        gen = torch.Generator(device=device).manual_seed(cfg.seed)
        rng = np.random.default_rng(cfg.seed)
        noise_sched = DDPMScheduler.from_config(pipe.scheduler.config)

        # Trainable parameters, kept in float32 whatever the pipeline's precision.
        new_emb = torch.nn.Parameter(init.to(device=device, dtype=torch.float32))
        kv = []
        for m in self.layers.values():
            for lin in (m.to_k, m.to_v):
                lin.to(torch.float32)
                lin.weight.requires_grad_(True)
                kv.append(lin.weight)
        for module in (unet, vae, te):
            module.requires_grad_(False)
        for p in kv:
            p.requires_grad_(True)
        params = [new_emb, *kv]
        lr = cfg.effective_lr(reg is not None)
        opt = torch.optim.AdamW(
            params,
            lr=lr,
            betas=(cfg.adam_beta1, cfg.adam_beta2),
            weight_decay=cfg.adam_weight_decay,
            eps=cfg.adam_epsilon,
        )
        amp = dtype != torch.float32
        autocast = (
            torch.autocast(device_type=device.type, dtype=dtype)
            if amp
            else contextlib.nullcontext()
        )
        scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

        hooks = [te.get_input_embeddings().register_forward_hook(self._splice(new_emb))]
        for m in self.layers.values():
            hooks.append(m.to_k.register_forward_hook(_detach_first_token))
            hooks.append(m.to_v.register_forward_hook(_detach_first_token))
        order = _Cycler(len(images), rng)
        reg_order = _Cycler(len(reg[0]), rng) if reg else None
        unet.train()
        if cfg.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        losses: list[float] = []
        t0 = time.perf_counter()
        try:
            for step in range(cfg.max_train_steps):
                pix, masks, prompts = [], [], []
                for i in order.take(cfg.train_batch_size):
                    example, example_mask, prefix = augment_example(
                        images[i], size, latent_size, rng, cfg.hflip, cfg.augment
                    )
                    pix.append(example)
                    masks.append(example_mask)
                    prompts.append(prefix + prompt)
                n_inst = len(pix)
                if reg is not None and reg_order is not None:
                    for i in reg_order.take(cfg.train_batch_size):
                        pix.append(_plain_example(_open_rgb(reg[0][i]), size))
                        masks.append(np.ones((latent_size, latent_size), np.float32))
                        prompts.append(reg[1][i])
                x = torch.from_numpy(np.stack(pix)).permute(0, 3, 1, 2).to(device, dtype)
                mask = torch.from_numpy(np.stack(masks))[:, None].to(device)
                ids = tok(
                    prompts,
                    padding="max_length",
                    max_length=tok.model_max_length,
                    truncation=True,
                    return_tensors="pt",
                ).input_ids.to(device)
                with torch.no_grad():
                    latents = vae.encode(x).latent_dist.sample(generator=gen)
                    latents = latents * vae.config.scaling_factor
                noise = torch.randn(
                    latents.shape, generator=gen, device=device, dtype=latents.dtype
                )
                t = torch.randint(
                    0,
                    noise_sched.config.num_train_timesteps,
                    (latents.shape[0],),
                    generator=gen,
                    device=device,
                ).long()
                noisy = noise_sched.add_noise(latents, noise, t)
                if noise_sched.config.prediction_type == "v_prediction":
                    target = noise_sched.get_velocity(latents, noise, t)
                else:
                    target = noise
                with autocast:
                    cond = te(ids)[0]
                    pred = unet(noisy, t, cond).sample
                err = F.mse_loss(pred.float(), target.float(), reduction="none")
                # As diffusers' script: summed over latent channels, averaged over masked
                # pixels (so this term weighs 4x a plain mean next to the prior loss).
                inst = err[:n_inst] * mask[:n_inst]
                loss = (inst.sum((1, 2, 3)) / mask[:n_inst].sum((1, 2, 3))).mean()
                if n_inst < len(pix):
                    loss = loss + cfg.prior_loss_weight * err[n_inst:].mean()
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                scaler.step(opt)
                scaler.update()
                losses.append(float(loss.detach()))
                if (step + 1) % max(1, cfg.max_train_steps // 10) == 0:
                    logger.info("  step %d/%d loss %.4f", step + 1, cfg.max_train_steps, losses[-1])
        finally:
            for h in hooks:
                h.remove()
            unet.eval()
            if cfg.gradient_checkpointing:
                unet.disable_gradient_checkpointing()
            # The float32 master values, not a float16 rounding of them, are what gets saved.
            trained_kv = {
                name: (
                    m.to_k.weight.detach().float().cpu().clone(),
                    m.to_v.weight.detach().float().cpu().clone(),
                )
                for name, m in self.layers.items()
            }
            for p in kv:
                p.requires_grad_(False)
            for m in self.layers.values():
                m.to_k.to(dtype)
                m.to_v.to(dtype)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        with torch.no_grad():
            te.get_input_embeddings().weight[self.token_id] = new_emb.detach().to(
                te.get_input_embeddings().weight.dtype
            )
        self._trained_kv = trained_kv
        self._trained_emb = new_emb.detach().float().cpu().clone()
        self._meta = {
            "mode": mode,
            "category": category,
            "train_prompt": prompt,
            "exemplars": [str(p) for p in list_images(exemplars)],
            "regularization": None if reg is None else {"images": [str(p) for p in reg[0]]},
            "config": asdict(cfg),
            "effective_lr": lr,
        }
        return TrainStats(cfg.max_train_steps, seconds, losses[-1] if losses else math.nan, losses)

    def _splice(self, new_emb: torch.nn.Parameter) -> Callable:
        token_id = self.token_id

        def hook(module, inputs, output):
            hit = (inputs[0] == token_id)[..., None]
            return torch.where(hit, new_emb.to(output.dtype), output)

        return hook

    # -- saving and resetting -----------------------------------------------------------
    def save(self, out: str | os.PathLike, extra: dict[str, Any] | None = None) -> Path:
        """Write the model in diffusers' Custom Diffusion format plus genattr's record."""
        if not hasattr(self, "_trained_kv"):
            raise GenattrError("nothing to save: train first")
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        state: dict[str, Any] = {}
        for name in self.pipe.unet.attn_processors:
            if name in self._trained_kv:
                k, v = self._trained_kv[name]
                state[f"{name}.to_k_custom_diffusion.weight"] = k.contiguous()
                state[f"{name}.to_v_custom_diffusion.weight"] = v.contiguous()
            else:
                state[name] = {}  # diffusers keeps an (empty) entry for every other layer
        assert self.token is not None
        for name, obj in (
            (WEIGHTS_NAME, state),
            (f"{self.token}.bin", {self.token: self._trained_emb.contiguous()}),
        ):
            # Through a buffer: torch.save names the archive after the file, and the temporary
            # file's random name would make identical models differ byte for byte.
            buf = io.BytesIO()
            torch.save(obj, buf)
            with atomic_path(out / name) as tmp:
                tmp.write_bytes(buf.getvalue())
                os.chmod(tmp, 0o644)
        info = {
            "kind": "genattr.custom_diffusion",
            "format_version": CUSTOMIZE_FORMAT_VERSION,
            "modifier_token": self.token,
            "initializer_token": self.initializer,
            "weights": WEIGHTS_NAME,
            "token_embedding": f"{self.token}.bin",
            **self._meta,
            **(extra or {}),
        }
        with atomic_path(out / INFO_NAME) as tmp:
            tmp.write_text(json.dumps(info, indent=1))
            os.chmod(tmp, 0o644)
        return out

    def reset(self) -> None:
        """Back to the base model: original key/value weights; the token's row is re-set on the
        next `train`, and no prompt without the token ever reads it."""
        with torch.no_grad():
            for name, m in self.layers.items():
                k, v = self._base_kv[name]
                m.to_k.weight.copy_(k)
                m.to_v.weight.copy_(v)


def _detach_first_token(module, inputs, output):
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


def _reg_set(
    reg_images: Sequence[str | os.PathLike] | None, reg_captions: Sequence[str] | None
) -> tuple[list[Path], list[str]] | None:
    if not reg_images:
        if reg_captions:
            raise GenattrError("regularization captions given without regularization images")
        return None
    paths = list_images(reg_images)
    caps = list(reg_captions or [])
    if len(caps) == 1:
        caps = caps * len(paths)
    if len(caps) != len(paths):
        raise GenattrError(
            f"{len(paths)} regularization images but {len(caps)} captions (give one caption "
            "per image, in name order, or one for all)"
        )
    return paths, caps


def read_reg_captions(path_or_prompt: str | os.PathLike) -> list[str]:
    """Captions from a text file (one per line) or, if no such file, one prompt for all."""
    p = Path(path_or_prompt)
    if p.is_file():
        return [ln.strip() for ln in p.read_text().splitlines() if ln.strip()]
    return [str(path_or_prompt)]


def customize(
    base: str | os.PathLike,
    exemplars: Sequence[str | os.PathLike],
    mode: str,
    out: str | os.PathLike,
    category: str | None = None,
    config: CustomizeConfig | None = None,
    reg_images: Sequence[str | os.PathLike] | None = None,
    reg_captions: Sequence[str] | None = None,
    device: str = "auto",
    dtype: str = "auto",
) -> tuple[Path, TrainStats]:
    """Load the base pipeline, train one Custom Diffusion model, save it to `out`."""
    training_prompt(mode, category)  # fail on bad input before loading a large model
    list_images(exemplars)
    pipe = load_base_pipeline(base, device, dtype)
    cz = Customizer(pipe)
    stats = cz.train(exemplars, mode, category, config, reg_images, reg_captions)
    cz.save(out, extra={"base": str(base), "train_seconds": round(stats.seconds, 3)})
    return Path(out), stats
