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

import io
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from genattr.atomic import atomic_path
from genattr.customize.config import (
    CUSTOMIZE_FORMAT_VERSION,
    INFO_NAME,
    WEIGHTS_NAME,
    Concept,
    CustomizeConfig,
    check_captions,
    concept_token,
    training_prompt,
)
from genattr.customize.examples import (
    list_images,
    open_training_image,
)
from genattr.customize.loop import (
    Batches,
    Step,
    detach_first_token,
    optimize,
    seconds_since,
)
from genattr.customize.pipeline import load_base_pipeline
from genattr.errors import GenattrError

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import (
        StableDiffusionPipeline,
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
        *,
        reg_images: Sequence[str | os.PathLike] | None = None,
        reg_captions: Sequence[str] | None = None,
        captions: Sequence[str] | None = None,
    ) -> TrainStats:
        """Tune the pipeline toward the exemplars (in place); returns timing and losses.
        One concept, with the config's modifier and initializer tokens; a captioned set
        (`mode="captioned"`) trains each image with its caption from `captions` instead.

        Args:
            exemplars: The concept's training images (files or folders).
            mode: 'object', 'style' or 'captioned'.
            category: The object's category (objects); None otherwise.
            config: The training options; the defaults of `CustomizeConfig` when None.
            reg_images: Regularization images trained beside the exemplars; none when None.
            reg_captions: The regularization images' captions, one per image in name order
                or one for all.
            captions: One caption per exemplar, in `list_images` order (`mode="captioned"`).
        """
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
                images = [open_training_image(p) for p in paths]
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
        batches = Batches(
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
        step = Step(self.pipe, [*new_embs, *kv], lr, cfg, gen, device, dtype)
        hooks = self._hooks(new_embs)
        unet.train()
        if cfg.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        t0 = time.perf_counter()
        try:
            losses = optimize(step, batches, cfg.max_train_steps)
        finally:
            trained = self._end_training(
                hooks, kv, dtype, cfg.gradient_checkpointing, cfg.freeze_model
            )
        seconds = seconds_since(t0, device)
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
            hooks.append(m.to_k.register_forward_hook(detach_first_token))
            hooks.append(m.to_v.register_forward_hook(detach_first_token))
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
    *,
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
    stats = cz.train(
        exemplars,
        mode,
        category,
        config,
        reg_images=reg_images,
        reg_captions=reg_captions,
        captions=captions,
    )
    cz.save(out, extra={"base": str(base), "train_seconds": round(stats.seconds, 3)})
    return Path(out), stats
