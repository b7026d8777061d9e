"""Custom Diffusion training (Kumari et al. 2023) as the AbC benchmark uses it.

Trainable: the embedding of one new modifier token per concept and the key/value projections
(`to_k`, `to_v`) of every cross-attention layer of the UNet; everything else stays frozen. Each
token's row is a separate parameter spliced into the embedding output, so no other row of the
embedding matrix can move (AdamW's weight decay would otherwise shrink them all). As in Custom
Diffusion, the keys and values of the first text token (start-of-text) get no gradient.

One model can learn several concepts at once (Custom Diffusion's multi-concept training,
diffusers' `--concepts_list` with `--modifier_token "<new1>+<new2>"`): each concept has its own
token, initializer, exemplars and training prompt; every step draws its examples from the
union of all concepts' exemplars, in shuffled passes. One concept is the same computation,
draw for draw, as it always was (`train` is `train_concepts` with one concept).

Saved in diffusers' Custom Diffusion format (`pytorch_custom_diffusion_weights.bin`, and one
`<newK>.bin` per token holding `{token: embedding}`, as diffusers' `save_new_embed`) plus
`genattr_customize.json`, which records how the model was made (and, for several concepts,
each concept: `concepts`).
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
from typing import TYPE_CHECKING, Annotated, Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pydantic import Field

from genattr.atomic import atomic_path
from genattr.customize.pipeline import load_base_pipeline
from genattr.data.images import ImageDecodeError, load_converted, open_image
from genattr.data.sources import folder_images
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
    # diffusers' `--freeze_model`: "crossattn_kv" trains every attn2's to_k/to_v (Custom
    # Diffusion); "crossattn" also its to_q and to_out (all of cross-attention).
    freeze_model: Literal["crossattn_kv", "crossattn"] = "crossattn_kv"

    def effective_lr(self, with_prior: bool) -> float:
        if not self.scale_lr:
            return self.learning_rate
        return self.learning_rate * self.train_batch_size * (2.0 if with_prior else 1.0)

    def record(self) -> dict[str, Any]:
        """The options as models and plan keys record them. Options added later are left out
        while they keep their defaults, so models made before them keep their bytes and keys."""
        out = asdict(self)
        if self.freeze_model == "crossattn_kv":
            del out["freeze_model"]
        return out


@dataclass
class Concept:
    """One concept of a Custom Diffusion model: its exemplars, mode ('object', 'style' or
    'captioned'), category (objects), modifier token (default `<newK>` for the K-th concept,
    from 1) and initializer (default the config's `initializer_token`).

    A 'captioned' concept is a set of images each trained with its own caption (`captions`,
    one per image in `list_images` order) and no modifier token: the paper's models tuned on
    random captioned images (MSCOCO) to test whether attribution generalizes."""

    exemplars: Sequence[str | os.PathLike]
    mode: str
    category: str | None = None
    token: str | None = None
    initializer: str | None = None
    captions: Sequence[str] | None = None


def concept_token(k: int) -> str:
    """The modifier token of the k-th concept (0-based): `<new1>`, `<new2>`, ..."""
    return f"<new{k + 1}>"


def config_from_dict(values: dict[str, Any] | None) -> CustomizeConfig:
    """A config from a plan's `train:` mapping; unknown keys and ill-typed values are errors."""
    return options_from_mapping(CustomizeConfig, values, "training")


def training_prompt(mode: str, category: str | None, token: str = "<new1>") -> str:
    """The authors' training prompts: '<new1> {category}' (objects), a style sentence (styles).
    Captioned sets have none: each image is trained with its own caption."""
    if mode == "captioned":
        raise GenattrError("a captioned set trains each image with its own caption")
    if mode == "object":
        if not category:
            raise GenattrError(
                f"object models need a --category (the training prompt is '{token} CATEGORY')"
            )
        return f"{token} {category}"
    if mode == "style":
        return f"A picture in the style of {token} art"
    raise GenattrError(f"mode must be 'object', 'style' or 'captioned', not {mode!r}")


def check_captions(paths: Sequence[Path], captions: Sequence[str] | None) -> list[str]:
    """One non-empty caption per image of a captioned set, or an error saying what is wrong."""
    caps = [str(c).strip() for c in captions or []]
    if len(caps) != len(paths):
        raise GenattrError(
            f"a captioned set needs one caption per image: {len(paths)} images, "
            f"{len(caps)} captions"
        )
    empty = [str(p.name) for p, c in zip(paths, caps, strict=True) if not c]
    if empty:
        raise GenattrError(f"empty caption for {empty[0]}")
    return caps


def list_images(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Image files from paths and folders (a folder gives its images as every command lists
    a folder: `genattr.data.sources.folder_images`)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(map(Path, folder_images(p).files))
        elif p.is_file():
            out.append(p)
        else:
            raise GenattrError(f"{p}: no such file or folder")
    if not out:
        raise GenattrError("no exemplar images given")
    return out


def _open_rgb(path: Path) -> Image.Image:
    """An image as training reads it, with extraction's guards (`load_converted`)."""
    try:
        return load_converted(path)
    except ImageDecodeError as e:
        raise GenattrError(f"{path}: not a readable image ({e})") from None


def check_image(path: Path) -> None:
    """Raise a GenattrError naming the file unless it is a readable image (header check)."""
    try:
        open_image(path)
    except ImageDecodeError as e:
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


def read_square(path: str | os.PathLike, size: int) -> np.ndarray:
    """An image file as training sees it without augmentation, (S, S, 3) uint8: RGB, the
    centre square, resized (bilinear); attribution methods that run the model read it so."""
    return np.asarray(
        _square(_open_rgb(Path(path))).resize((size, size), Image.Resampling.BILINEAR)
    )


@dataclass
class TrainStats:
    steps: int
    seconds: float
    final_loss: float
    losses: list[float] = field(default_factory=list)
    draws: list[int] = field(default_factory=list)  # exemplar draws per concept

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


# The cross-attention projections each `freeze_model` setting trains, in optimizer order (keys
# and values first, as Custom Diffusion), with the key each one has in diffusers' format.
_TRAINED_PROJECTIONS = {
    "crossattn_kv": (("to_k", "to_k_custom_diffusion"), ("to_v", "to_v_custom_diffusion")),
    "crossattn": (
        ("to_k", "to_k_custom_diffusion"),
        ("to_v", "to_v_custom_diffusion"),
        ("to_q", "to_q_custom_diffusion"),
        ("to_out.0", "to_out_custom_diffusion.0"),
    ),
}


@dataclass
class _Resolved:
    """A concept ready to train: its token, initializer, training prompt and images (a
    captioned set: no token, no prompt, one caption per image)."""

    token: str | None
    initializer: str
    mode: str
    category: str | None
    prompt: str | None
    paths: list[Path]
    images: list[Image.Image]
    captions: list[str] | None = None

    @property
    def image_prompts(self) -> list[str]:
        """The prompt each image is trained with."""
        return self.captions if self.captions is not None else [str(self.prompt)] * len(self.paths)


class Customizer:
    """Custom Diffusion on one loaded pipeline, reusable model after model: `train` (one
    concept) or `train_concepts` (several) changes the pipeline in place, `save` writes the
    model, `reset` restores the base weights exactly.

    After training, `token`, `initializer` and `prompt` are the first concept's; `tokens` and
    `prompts` list every concept's."""

    def __init__(self, pipe: StableDiffusionPipeline) -> None:
        self.pipe = pipe
        self.layers = cross_attention_layers(pipe.unet)
        if not self.layers:
            raise GenattrError("the base UNet has no cross-attention layers to customize")
        # Every weight any `freeze_model` setting trains, as the base model has it.
        self._base = {
            name: {
                f"{proj}.{kind}": t.detach().clone()
                for proj, _ in _TRAINED_PROJECTIONS["crossattn"]
                for kind, t in m.get_submodule(proj).named_parameters()
            }
            for name, m in self.layers.items()
        }
        self.token: str | None = None
        self.token_id: int | None = None
        self.initializer: str | None = None
        self.prompt: str | None = None
        self.tokens: list[str] = []
        self.prompts: list[str] = []
        self._token_ids: dict[str, int] = {}  # every token this pipeline's tokenizer got

    # -- the modifier tokens ------------------------------------------------------------
    def _add_token(self, token: str, initializer: str) -> torch.Tensor:
        """Make `token` one id of the tokenizer (added once per pipeline) and return the
        embedding it starts from: the initializer's (mean of its pieces if it is several)."""
        tok, te = self.pipe.tokenizer, self.pipe.text_encoder
        if token not in self._token_ids:
            if tok.convert_tokens_to_ids(token) not in (None, tok.unk_token_id):
                raise GenattrError(f"the tokenizer already has {token!r}; pick another token")
            tok.add_tokens(token)
            te.resize_token_embeddings(len(tok), mean_resizing=False)
            self._token_ids[token] = tok.convert_tokens_to_ids(token)
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
        captions: Sequence[str] | None = None,
    ) -> TrainStats:
        """Tune the pipeline toward the exemplars (in place); returns timing and losses.
        One concept, with the config's modifier and initializer tokens; a captioned set
        (`mode="captioned"`) trains each image with its caption from `captions` instead."""
        cfg = config or CustomizeConfig()
        token = None if mode == "captioned" else cfg.modifier_token
        concept = Concept(exemplars, mode, category, token, cfg.initializer_token, captions)
        return self._train([concept], cfg, reg_images, reg_captions, multi=False)

    def train_concepts(
        self,
        concepts: Sequence[Concept],
        config: CustomizeConfig | None = None,
        reg_images: Sequence[str | os.PathLike] | None = None,
        reg_captions: Sequence[str] | None = None,
    ) -> TrainStats:
        """Tune the pipeline toward several concepts at once (in place), one modifier token
        each, examples drawn from the union of their exemplars. `config.max_train_steps` is
        the total: scale it with the number of concepts to give each as many steps as a
        single-concept model. One concept here is exactly `train` (same draws, same bytes)
        except that `save` records it as a list of concepts."""
        if not concepts:
            raise GenattrError("no concepts to train")
        return self._train(list(concepts), config or CustomizeConfig(), reg_images, reg_captions)

    def _resolve(self, concepts: list[Concept], cfg: CustomizeConfig) -> list[_Resolved]:
        """Tokens, initializers, prompts and images of the concepts; errors name the concept."""
        if len(concepts) > 1 and any(c.mode == "captioned" for c in concepts):
            raise GenattrError("a captioned set is trained alone, not beside other concepts")
        out: list[_Resolved] = []
        for k, c in enumerate(concepts):
            captioned = c.mode == "captioned"
            token = None if captioned else c.token or concept_token(k)
            initializer = c.initializer or cfg.initializer_token
            where = f"concept {k + 1} ({token})" if len(concepts) > 1 else None
            try:
                prompt = None if captioned else training_prompt(c.mode, c.category, str(token))
                paths = list_images(c.exemplars)
                caps = check_captions(paths, c.captions) if captioned else None
                images = [_open_rgb(p) for p in paths]
            except GenattrError as e:
                raise GenattrError(f"{where}: {e}" if where else str(e)) from None
            out.append(
                _Resolved(token, initializer, c.mode, c.category, prompt, paths, images, caps)
            )
        tokens = [r.token for r in out]
        if len(set(tokens)) != len(tokens):
            raise GenattrError(f"each concept needs its own modifier token, not {tokens}")
        return out

    def _train(
        self,
        concepts: list[Concept],
        cfg: CustomizeConfig,
        reg_images: Sequence[str | os.PathLike] | None,
        reg_captions: Sequence[str] | None,
        multi: bool = True,
    ) -> TrainStats:
        unet = self.pipe.unet
        device, dtype = unet.device, unet.dtype
        resolved = self._resolve(concepts, cfg)
        reg = _reg_set(reg_images, reg_captions)
        self.reset()
        tokened = [r for r in resolved if r.token is not None]
        inits = [self._add_token(str(r.token), r.initializer) for r in tokened]
        self.tokens = [str(r.token) for r in tokened]
        self.prompts = [r.prompt for r in resolved if r.prompt is not None]
        self.token = self.tokens[0] if self.tokens else None
        self.token_id = self._token_ids[self.token] if self.token else None
        self.initializer = resolved[0].initializer if self.token else None
        self.prompt = resolved[0].prompt
        latent_size = self._latent_size(cfg.resolution)
        gen = torch.Generator(device=device).manual_seed(cfg.seed)
        images = [im for r in resolved for im in r.images]
        owner = [k for k, r in enumerate(resolved) for _ in r.images]
        batches = _Batches(
            images,
            [p for r in resolved for p in r.image_prompts],
            reg,
            cfg,
            latent_size,
            np.random.default_rng(cfg.seed),
            owner,
        )
        new_embs, kv = self._trainable(
            [i.to(device=device, dtype=torch.float32) for i in inits], cfg.freeze_model
        )
        lr = cfg.effective_lr(reg is not None)
        step = _Step(self.pipe, [*new_embs, *kv], lr, cfg, gen, device, dtype)
        hooks = self._hooks(new_embs)
        unet.train()
        if cfg.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        t0 = time.perf_counter()
        try:
            losses = _optimize(step, batches, cfg.max_train_steps)
        finally:
            trained = self._end_training(
                hooks, kv, dtype, cfg.gradient_checkpointing, cfg.freeze_model
            )
        seconds = _seconds_since(t0, device)
        self._keep_trained(new_embs, trained)
        if multi:
            self._meta = _concepts_record(resolved, batches.draws, reg, cfg, lr)
        else:
            r = resolved[0]
            self._meta = _training_record(r.mode, r.category, r.prompt, r.paths, reg, cfg, lr)
            if r.captions is not None:
                self._meta["captions"] = r.captions
        self._multi = multi
        final = losses[-1] if losses else math.nan
        return TrainStats(cfg.max_train_steps, seconds, final, losses, list(batches.draws))

    def _latent_size(self, size: int) -> int:
        """The latent side for training images of side `size`, which the VAE must divide."""
        factor = self.pipe.vae_scale_factor
        latent_size = size // factor
        if latent_size * factor != size or latent_size < 3:
            raise GenattrError(f"resolution {size} must be a multiple of the VAE factor {factor}")
        return latent_size

    def _trainable(
        self, inits: list[torch.Tensor], freeze_model: str
    ) -> tuple[list[torch.nn.Parameter], list[torch.Tensor]]:
        """The tokens' embeddings (from `inits`) and the cross-attention projections
        `freeze_model` trains (keys and values; or all four), in float32 whatever the
        pipeline's precision, as the only parameters with gradients."""
        new_embs = [torch.nn.Parameter(init) for init in inits]
        kv = []
        for m in self.layers.values():
            for proj, _ in _TRAINED_PROJECTIONS[freeze_model]:
                lin = m.get_submodule(proj)
                lin.to(torch.float32)
                kv.extend(lin.parameters())
        for module in (self.pipe.unet, self.pipe.vae, self.pipe.text_encoder):
            module.requires_grad_(False)
        for p in kv:
            p.requires_grad_(True)
        return new_embs, kv

    def _hooks(self, new_embs: list[torch.nn.Parameter]) -> list[Any]:
        """Splice the tokens' embeddings into the text encoder and keep the start-of-text
        token's keys and values out of the gradient; the handles, to remove them."""
        embeddings = self.pipe.text_encoder.get_input_embeddings()
        hooks = [embeddings.register_forward_hook(self._splice(new_embs))]
        for m in self.layers.values():
            hooks.append(m.to_k.register_forward_hook(_detach_first_token))
            hooks.append(m.to_v.register_forward_hook(_detach_first_token))
        return hooks

    def _end_training(
        self,
        hooks: list[Any],
        kv: list[torch.Tensor],
        dtype: torch.dtype,
        checkpointing: bool,
        freeze_model: str,
    ) -> dict[str, dict[str, torch.Tensor]]:
        """Undo the training set-up (hooks, train mode, float32 projections) and return the
        trained projections as the float32 master values, on the CPU, per processor under
        diffusers' Custom Diffusion keys (`to_k_custom_diffusion.weight`, ...)."""
        for h in hooks:
            h.remove()
        self.pipe.unet.eval()
        if checkpointing:
            self.pipe.unet.disable_gradient_checkpointing()
        # The float32 master values, not a float16 rounding of them, are what gets saved.
        trained = {
            name: {
                f"{key}.{kind}": t.detach().float().cpu().clone()
                for proj, key in _TRAINED_PROJECTIONS[freeze_model]
                for kind, t in m.get_submodule(proj).named_parameters()
            }
            for name, m in self.layers.items()
        }
        for p in kv:
            p.requires_grad_(False)
        for m in self.layers.values():
            for proj, _ in _TRAINED_PROJECTIONS[freeze_model]:
                m.get_submodule(proj).to(dtype)
        return trained

    def _keep_trained(
        self,
        new_embs: list[torch.nn.Parameter],
        trained: dict[str, dict[str, torch.Tensor]],
    ) -> None:
        """Write the tokens' rows into the embedding table and keep what `save` writes."""
        weight = self.pipe.text_encoder.get_input_embeddings().weight
        with torch.no_grad():
            for token, emb in zip(self.tokens, new_embs, strict=True):
                weight[self._token_ids[token]] = emb.detach().to(weight.dtype)
        self._trained = trained
        self._trained_embs = [emb.detach().float().cpu().clone() for emb in new_embs]

    def _splice(self, new_embs: list[torch.nn.Parameter]) -> Callable:
        pairs = [(self._token_ids[t], e) for t, e in zip(self.tokens, new_embs, strict=True)]

        def hook(module, inputs, output):
            for token_id, new_emb in pairs:
                hit = (inputs[0] == token_id)[..., None]
                output = torch.where(hit, new_emb.to(output.dtype), output)
            return output

        return hook

    # -- saving and resetting -----------------------------------------------------------
    def save(self, out: str | os.PathLike, extra: dict[str, Any] | None = None) -> Path:
        """Write the model in diffusers' Custom Diffusion format plus genattr's record."""
        if not hasattr(self, "_trained"):
            raise GenattrError("nothing to save: train first")
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        state: dict[str, Any] = {}
        for name in self.pipe.unet.attn_processors:
            if name in self._trained:
                for key, t in self._trained[name].items():
                    state[f"{name}.{key}"] = t.contiguous()
            else:
                state[name] = {}  # diffusers keeps an (empty) entry for every other layer
        embeddings = [
            (f"{token}.bin", {token: emb.contiguous()})
            for token, emb in zip(self.tokens, self._trained_embs, strict=True)
        ]
        for name, obj in ((WEIGHTS_NAME, state), *embeddings):
            # Through a buffer: torch.save names the archive after the file, and the temporary
            # file's random name would make identical models differ byte for byte.
            buf = io.BytesIO()
            torch.save(obj, buf)
            with atomic_path(out / name) as tmp:
                tmp.write_bytes(buf.getvalue())
                os.chmod(tmp, 0o644)
        head: dict[str, Any] = {
            "kind": "genattr.custom_diffusion",
            "format_version": CUSTOMIZE_FORMAT_VERSION,
        }
        if self.token is None:  # a captioned set: no modifier token
            head |= {"modifier_tokens": [], "weights": WEIGHTS_NAME}
        elif self._multi:
            head |= {
                "modifier_tokens": self.tokens,
                "weights": WEIGHTS_NAME,
                "token_embeddings": [name for name, _ in embeddings],
            }
        else:  # the one-concept record, unchanged since the first release
            head |= {
                "modifier_token": self.token,
                "initializer_token": self.initializer,
                "weights": WEIGHTS_NAME,
                "token_embedding": f"{self.token}.bin",
            }
        info = {**head, **self._meta, **(extra or {})}
        with atomic_path(out / INFO_NAME) as tmp:
            tmp.write_text(json.dumps(info, indent=1))
            os.chmod(tmp, 0o644)
        return out

    def reset(self) -> None:
        """Back to the base model: original cross-attention weights; the tokens' rows are
        re-set on the next `train`, and no prompt without a token ever reads them."""
        with torch.no_grad():
            for name, m in self.layers.items():
                live = dict(m.named_parameters())
                for key, base in self._base[name].items():
                    live[key].copy_(base)


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


@dataclass
class _Batch:
    """One step's examples: images (HWC, [-1, 1]), loss masks and prompts, the first `n_inst`
    of them exemplars, the rest regularization images."""

    pix: list[np.ndarray]
    masks: list[np.ndarray]
    prompts: list[str]
    n_inst: int


class _Batches:
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
                self.images[i], size, latent_size, self.rng, cfg.hflip, cfg.augment
            )
            pix.append(example)
            masks.append(example_mask)
            prompts.append(prefix + self.prompts[i])
            self.draws[self.owner[i]] += 1
        n_inst = len(pix)
        if self.reg is not None and self.reg_order is not None:
            for i in self.reg_order.take(cfg.train_batch_size):
                pix.append(_plain_example(_open_rgb(self.reg[0][i]), size))
                masks.append(np.ones((latent_size, latent_size), np.float32))
                prompts.append(self.reg[1][i])
        return _Batch(pix, masks, prompts, n_inst)


class _Step:
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
        ids = tok(
            batch.prompts,
            padding="max_length",
            max_length=tok.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(device)
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


def _optimize(step: _Step, batches: _Batches, steps: int) -> list[float]:
    """`steps` training steps, logging the loss ten times along the way; the losses."""
    losses: list[float] = []
    for i in range(steps):
        losses.append(step(batches.next()))
        if (i + 1) % max(1, steps // 10) == 0:
            logger.info("  step %d/%d loss %.4f", i + 1, steps, losses[-1])
    return losses


def _seconds_since(t0: float, device: torch.device) -> float:
    """Seconds since `t0` (`time.perf_counter`), once the GPU's queued work has finished."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def _training_record(
    mode: str,
    category: str | None,
    prompt: str | None,
    exemplars: Sequence[str | os.PathLike],
    reg: tuple[list[Path], list[str]] | None,
    cfg: CustomizeConfig,
    lr: float,
) -> dict[str, Any]:
    """How a model was trained, as `save` records it in genattr_customize.json."""
    return {
        "mode": mode,
        "category": category,
        "train_prompt": prompt,
        "exemplars": [str(p) for p in list_images(exemplars)],
        "regularization": None if reg is None else {"images": [str(p) for p in reg[0]]},
        "config": cfg.record(),
        "effective_lr": lr,
    }


def _concepts_record(
    resolved: list[_Resolved],
    draws: list[int],
    reg: tuple[list[Path], list[str]] | None,
    cfg: CustomizeConfig,
    lr: float,
) -> dict[str, Any]:
    """How a multi-concept model was trained: each concept (token, initializer, mode,
    category, training prompt, exemplars, how many exemplar draws it got) and the options."""
    return {
        "concepts": [
            {
                "token": r.token,
                "initializer_token": r.initializer,
                "mode": r.mode,
                "category": r.category,
                "train_prompt": r.prompt,
                "exemplars": [str(p) for p in r.paths],
                "draws": n,
            }
            for r, n in zip(resolved, draws, strict=True)
        ],
        "regularization": None if reg is None else {"images": [str(p) for p in reg[0]]},
        "config": cfg.record(),
        "effective_lr": lr,
    }


def model_concepts(info: dict[str, Any]) -> list[dict[str, Any]]:
    """The concepts of a model from its `genattr_customize.json` record, for one-concept and
    multi-concept records alike (token, mode, category, train_prompt, exemplars)."""
    if "concepts" in info:
        return list(info["concepts"])
    if "modifier_token" not in info:
        return []
    keys = ("mode", "category", "train_prompt", "exemplars")
    return [
        {
            "token": info["modifier_token"],
            "initializer_token": info.get("initializer_token"),
            **{k: info.get(k) for k in keys},
        }
    ]


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
    captions: Sequence[str] | None = None,
) -> tuple[Path, TrainStats]:
    """Load the base pipeline, train one Custom Diffusion model, save it to `out` (a
    captioned set: `mode="captioned"` and one caption per image)."""
    # Fail on bad input before loading a large model.
    if mode == "captioned":
        check_captions(list_images(exemplars), captions)
    else:
        training_prompt(mode, category)
        list_images(exemplars)
    pipe = load_base_pipeline(base, device, dtype)
    cz = Customizer(pipe)
    stats = cz.train(exemplars, mode, category, config, reg_images, reg_captions, captions)
    cz.save(out, extra={"base": str(base), "train_seconds": round(stats.seconds, 3)})
    return Path(out), stats
