"""Unlearning attribution (AbU: Wang, Hertzmann, Efros, Zhu, Zhang, "Data Attribution for
Text-to-Image Models by Unlearning Synthesized Images", NeurIPS 2024).

To attribute a synthesized image, make the model forget it: a few Fisher-preconditioned
gradient-ascent steps on the query's denoising loss (the Fisher diagonal of the training loss
keeps the step away from directions the rest of the training set depends on, so unrelated
concepts are not forgotten), then measure how much each training image's loss went up. The
images the model forgot along with the query are the ones that taught it the query.

Algorithm layer: in-memory objects only (a diffusers UNet, its scheduler, latents and text
hidden states); the VAE and the text encoder stay with the caller. The loss, the fixed
timesteps and the fixed noises are the gradient attributor's (`genattr.methods.gradient`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from typing import Annotated, Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from genattr.methods.gradient import (
    ParamSet,
    check_latents_and_text,
    denoising_outputs,
    derived_seed,
    fixed_noises,
    grad_only,
    select_parameters,
    spec_timesteps,
)
from genattr.progress import progress_bar

logger = logging.getLogger(__name__)

# the unlearning steps' random (timestep, noise) pairs; streams 1 and 2 are gradient.py's
_UNLEARN_STREAM = 3


# AbU's custom-diffusion setting (SD 1.x): lr 0.1 against N = 400M training images (LAION-400M,
# hard-coded), on the cross-attention key/value weights, 2 x 768 x 12,480 = 19,169,280 of them.
ABU_LR = 0.1
ABU_TRAIN_SIZE = 400_000_000
ABU_SD_KV_PARAMS = 19_169_280


class UnlearningSpec(BaseModel):
    """How the model unlearns a query and how losses are measured; checked when built.

    Loss evaluation (and the Fisher estimate): `timesteps` (None: the gradient attributor's 4
    spread over the schedule, 125/375/625/875 of 1000), each with `noises_per_timestep` fixed
    noises drawn from `seed` alone, the same for every image, before and after unlearning;
    an image's loss is the mean over these pairs.
    Unlearning: `steps` updates of the `params` set, each theta += step_size * g / (F + lambda),
    g the gradient of the query's loss averaged over `samples_per_step` (timestep, noise)
    pairs drawn afresh per step (distinct timesteps, uniform over the schedule, as AbU;
    seeded from `seed`), F the Fisher diagonal (mean over training images), lambda = `damping`
    times F's mean (AbU: none). `step_size` is AbU's lr / N (N the training set's size, which
    makes the mean Fisher the curvature of the summed training loss); None: AbU's own value
    on SD 1.x (0.1 / 4e8 over 19.2M key/value weights) carried to this model's parameter
    count, step_size = 0.1 * 19,169,280 / 4e8 / n_params, so each step raises the query's
    loss by about as much (first order) as one of AbU's. `flip`: score each gallery image by
    the larger loss change of it and its horizontally flipped copy (AbU's max)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    timesteps: Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)] | None = None
    noises_per_timestep: Annotated[int, Field(ge=1)] = 1
    seed: int = 0
    params: ParamSet = "cross_attn_kv"
    steps: Annotated[int, Field(ge=1)] = 100
    step_size: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None
    samples_per_step: Annotated[int, Field(ge=1)] = 16
    damping: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.0
    flip: bool = False


def resolved_step_size(spec: UnlearningSpec, n_params: int) -> float:
    """The spec's step size, or for None AbU's SD 1.x value scaled to `n_params` parameters."""
    if spec.step_size is not None:
        return spec.step_size
    return ABU_LR * ABU_SD_KV_PARAMS / ABU_TRAIN_SIZE / n_params


def _evaluation_pairs(
    spec: UnlearningSpec, scheduler: Any, latent_shape: tuple[int, ...], device: Any, dtype: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed (timesteps, noises) every image's loss is measured at: each timestep repeated
    `noises_per_timestep` times, with that many of the seed's fixed noises (the first k are
    the gradient attributor's)."""
    ts = spec_timesteps(spec, scheduler.config.num_train_timesteps)
    m = spec.noises_per_timestep
    noises = fixed_noises(spec, latent_shape, len(ts) * m).to(device, dtype)
    timesteps = torch.tensor(ts * m, dtype=torch.long, device=device)
    return timesteps, noises


def _selected(unet: Any, spec: UnlearningSpec) -> list[torch.Tensor]:
    return [p for _, p in select_parameters(unet, spec.params)]


def fisher_diagonal(
    unet: Any,
    scheduler: Any,
    latents: torch.Tensor,
    text_embeddings: torch.Tensor,
    spec: UnlearningSpec,
    *,
    progress: bool = False,
) -> list[torch.Tensor]:
    """The empirical Fisher diagonal of the training loss, one float64 CPU tensor per selected
    parameter (`select_parameters` order): the mean over images and over the spec's fixed
    (timestep, noise) pairs of the squared gradient of that single-pair denoising loss, as
    AbU estimates it (per-sample gradients, squared, averaged). Pass the training images
    (with their flipped copies where the scores use flips, as AbU does). One image and one
    pair at a time: memory holds one graph and the float64 sums, whatever N."""
    check_latents_and_text(latents, text_embeddings)
    if len(latents) == 0:
        raise ValueError("the Fisher needs at least one image")
    params = _selected(unet, spec)
    device, dtype = params[0].device, params[0].dtype
    timesteps, noises = _evaluation_pairs(spec, scheduler, tuple(latents.shape[1:]), device, dtype)
    sums = [torch.zeros(p.shape, dtype=torch.float64, device=device) for p in params]
    with grad_only(unet, params), progress_bar("fisher", len(latents), enabled=progress) as adv:
        for latent, text in zip(latents, text_embeddings, strict=True):
            x0, c = latent.to(device, dtype)[None], text.to(device, dtype)[None]
            for j in range(len(timesteps)):
                loss = denoising_outputs(
                    unet, scheduler, x0, c, timesteps=timesteps[j : j + 1], noises=noises[j : j + 1]
                ).sum()
                for acc, g in zip(sums, torch.autograd.grad(loss, params), strict=True):
                    acc += g.double().square()
            adv(1)
    count = len(latents) * len(timesteps)
    return [(acc / count).cpu() for acc in sums]


def _denominators(
    params: Sequence[torch.Tensor], fisher: Sequence[torch.Tensor], spec: UnlearningSpec
) -> list[torch.Tensor]:
    """F + lambda per parameter (float64, on each parameter's device), checked: one tensor per
    selected parameter, same shapes, finite, non-negative, and no zero left after damping."""
    if len(fisher) != len(params):
        raise ValueError(
            f"the Fisher has {len(fisher)} tensors; parameter set {spec.params!r} selects "
            f"{len(params)}"
        )
    total, count = 0.0, 0
    for i, (p, f) in enumerate(zip(params, fisher, strict=True)):
        if tuple(f.shape) != tuple(p.shape):
            raise ValueError(
                f"Fisher tensor {i} is {tuple(f.shape)}; its parameter {tuple(p.shape)}"
            )
        if not bool(torch.isfinite(f).all()):
            raise ValueError(f"Fisher tensor {i} has non-finite entries")
        if bool((f < 0).any()):
            raise ValueError(f"Fisher tensor {i} has negative entries")
        total += float(f.double().sum())
        count += f.numel()
    lam = spec.damping * total / count
    out = [f.to(p.device, torch.float64) + lam for p, f in zip(params, fisher, strict=True)]
    if any(bool((d <= 0).any()) for d in out):
        raise ValueError("the Fisher has zero entries and damping is 0: set damping > 0")
    return out


def _query_batch(
    query_latents: torch.Tensor, query_text: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """A query as (n, C, H, W) latents and (n, L, D) text: one image (3-dim and 2-dim) or a
    set of images unlearned together (their losses averaged)."""
    if query_latents.ndim == 3 and query_text.ndim == 2:
        return query_latents[None], query_text[None]
    check_latents_and_text(query_latents, query_text)
    if len(query_latents) == 0:
        raise ValueError("the query has no image")
    return query_latents, query_text


@contextlib.contextmanager
def unlearned(
    unet: Any,
    scheduler: Any,
    query_latents: torch.Tensor,
    query_text: torch.Tensor,
    *,
    fisher: Sequence[torch.Tensor],
    spec: UnlearningSpec,
    batch_size: int = 16,
) -> Iterator[list[float]]:
    """Within: the UNet after `spec.steps` Fisher-preconditioned gradient-ascent steps on the
    query's denoising loss (see `UnlearningSpec`); afterwards the selected parameters are put
    back bit for bit, and `requires_grad` flags and train/eval mode as they were (also on
    error). Yields the query's loss at each step's pairs, before that step's update (a trace
    that should rise). `batch_size` bounds the pairs per UNet call; the gradient is the same.

    Args:
        unet: The denoising UNet (its selected parameters are changed within, then restored).
        scheduler: The noise scheduler.
        query_latents: The query's latents: one image (C, H, W) or a set (N, C, H, W).
        query_text: The query's text embeddings: (L, D), or (N, L, D) for a set.
        fisher: The Fisher diagonal (`fisher_diagonal`), one tensor per selected parameter.
        spec: How the model unlearns the query (`UnlearningSpec`).
        batch_size: The most (timestep, noise) pairs per UNet call.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, not {batch_size}")
    lat, txt = _query_batch(query_latents, query_text)
    params = _selected(unet, spec)
    denominators = _denominators(params, fisher, spec)
    device, dtype = params[0].device, params[0].dtype
    lat, txt = lat.to(device, dtype), txt.to(device, dtype)
    n_train = scheduler.config.num_train_timesteps
    m = spec.samples_per_step
    gen = torch.Generator().manual_seed(derived_seed(spec.seed, _UNLEARN_STREAM))
    coef = resolved_step_size(spec, sum(p.numel() for p in params))
    originals = [p.detach().clone() for p in params]
    trace: list[float] = []
    try:
        with grad_only(unet, params):
            for _ in range(spec.steps):
                if m <= n_train:
                    ts = torch.randperm(n_train, generator=gen)[:m]
                else:
                    ts = torch.randint(0, n_train, (m,), generator=gen)
                eps = torch.randn((m, *lat.shape[1:]), generator=gen)
                ts, eps = ts.to(device), eps.to(device, dtype)
                grads = [torch.zeros_like(p, dtype=torch.float64) for p in params]
                step_loss = 0.0
                for s in range(0, m, batch_size):
                    out = denoising_outputs(
                        unet,
                        scheduler,
                        lat,
                        txt,
                        timesteps=ts[s : s + batch_size],
                        noises=eps[s : s + batch_size],
                    )
                    loss = out.sum() / out.new_tensor(
                        len(lat) * m
                    )  # this chunk's share of the mean
                    step_loss += float(loss.detach())
                    for acc, g in zip(grads, torch.autograd.grad(loss, params), strict=True):
                        acc += g.double()
                trace.append(step_loss)
                with torch.no_grad():
                    for p, g, d in zip(params, grads, denominators, strict=True):
                        p.add_((coef * g / d).to(p.dtype))
        logger.debug("unlearning trace of the query's loss: %s", trace)
        yield trace
    finally:
        with torch.no_grad():
            for p, orig in zip(params, originals, strict=True):
                p.copy_(orig)


def image_losses(
    unet: Any,
    scheduler: Any,
    latents: torch.Tensor,
    text_embeddings: torch.Tensor,
    spec: UnlearningSpec,
    *,
    batch_size: int = 16,
) -> np.ndarray:
    """(N,) float64: each image's denoising loss, the mean over the spec's fixed (timestep,
    noise) pairs, without gradients, `batch_size` images per UNet call (times the pairs).
    Under the unchanged model this is also the query-independent control score. Loss changes
    are compared at the same `batch_size`, so both sides run the same kernels."""
    check_latents_and_text(latents, text_embeddings)
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, not {batch_size}")
    params = _selected(unet, spec)
    device, dtype = params[0].device, params[0].dtype
    timesteps, noises = _evaluation_pairs(spec, scheduler, tuple(latents.shape[1:]), device, dtype)
    out = np.empty(len(latents), dtype=np.float64)
    with grad_only(unet, []), torch.no_grad():
        for s in range(0, len(latents), batch_size):
            lat = latents[s : s + batch_size].to(device, dtype)
            txt = text_embeddings[s : s + batch_size].to(device, dtype)
            per_pair = denoising_outputs(
                unet, scheduler, lat, txt, timesteps=timesteps, noises=noises
            )
            out[s : s + len(lat)] = per_pair.double().mean(dim=1).cpu().numpy()
    return out


def unlearning_scores(
    unet: Any,
    scheduler: Any,
    gallery_latents: torch.Tensor,
    gallery_text: torch.Tensor,
    *,
    query_latents: torch.Tensor,
    query_text: torch.Tensor,
    fisher: Sequence[torch.Tensor],
    spec: UnlearningSpec,
    base_losses: np.ndarray | None = None,
    gallery_latents_flipped: torch.Tensor | None = None,
    batch_size: int = 16,
    progress: bool = False,
) -> np.ndarray:
    """(Q, G) float64: per query (one image each), every gallery image's loss change when the
    model unlearns that query (unlearned minus original; higher = more influential), the
    weights restored after each query. With `spec.flip`, `gallery_latents_flipped` (the
    flipped images' latents, same text) is required and a score is the larger change of the
    two views. `base_losses`: the original losses from `image_losses` at the same
    `batch_size`, (G,) or with flips (2, G) (plain, flipped); computed here when None. Pass
    them when scoring several query batches against one gallery: they are G forward passes
    (times the pairs) per view that do not depend on the query.

    Args:
        unet: The denoising UNet (restored after each query).
        scheduler: The noise scheduler.
        gallery_latents: The gallery images' latents, (G, C, H, W).
        gallery_text: The gallery images' text embeddings, (G, L, D).
        query_latents: The queries' latents, (Q, C, H, W), one image per query.
        query_text: The queries' text embeddings, (Q, L, D).
        fisher: The Fisher diagonal (`fisher_diagonal`), one tensor per selected parameter.
        spec: How the model unlearns and how losses are measured (`UnlearningSpec`).
        base_losses: The gallery's original losses, (G,) or (2, G) with flips; computed
            here when None.
        gallery_latents_flipped: The flipped gallery images' latents (required with
            `spec.flip`, otherwise None).
        batch_size: The most images (losses) or pairs (unlearning) per UNet call.
        progress: Whether to show a progress bar over the queries.
    """
    check_latents_and_text(gallery_latents, gallery_text)
    check_latents_and_text(query_latents, query_text)
    if len(gallery_latents) == 0:
        raise ValueError("the gallery is empty")
    if gallery_latents.shape[1:] != query_latents.shape[1:]:
        raise ValueError(
            f"gallery latents {tuple(gallery_latents.shape[1:])} and query latents "
            f"{tuple(query_latents.shape[1:])} differ in shape"
        )
    if spec.flip != (gallery_latents_flipped is not None):
        raise ValueError(
            "spec.flip is set but no flipped gallery latents were given"
            if spec.flip
            else "flipped gallery latents were given but spec.flip is not set"
        )
    views = [gallery_latents]
    if gallery_latents_flipped is not None:
        if gallery_latents_flipped.shape != gallery_latents.shape:
            raise ValueError(
                f"flipped gallery latents are {tuple(gallery_latents_flipped.shape)}; the "
                f"gallery's {tuple(gallery_latents.shape)}"
            )
        views.append(gallery_latents_flipped)
    n_gallery = len(gallery_latents)
    _denominators(_selected(unet, spec), fisher, spec)  # fail before any work

    def losses() -> np.ndarray:
        return np.stack(
            [
                image_losses(unet, scheduler, v, gallery_text, spec, batch_size=batch_size)
                for v in views
            ]
        )

    if base_losses is None:
        base = losses()
    else:
        base = np.asarray(base_losses, dtype=np.float64)
        if base.shape == (n_gallery,):
            base = base[None]
        if base.shape != (len(views), n_gallery):
            want = f"({n_gallery},)" if len(views) == 1 else f"(2, {n_gallery})"
            raise ValueError(f"base_losses must be {want}; got {tuple(np.shape(base_losses))}")
        if not np.isfinite(base).all():
            raise ValueError("base_losses has non-finite entries")
    out = np.empty((len(query_latents), n_gallery), dtype=np.float64)
    with progress_bar("unlearning", len(query_latents), unit="query", enabled=progress) as adv:
        for q in range(len(query_latents)):
            with unlearned(
                unet,
                scheduler,
                query_latents[q],
                query_text[q],
                fisher=fisher,
                spec=spec,
                batch_size=batch_size,
            ) as trace:
                after = losses()
            logger.info(
                "query %d: its loss %.4g -> %.4g over %d steps; gallery loss change mean %.3g",
                q,
                trace[0],
                trace[-1],
                len(trace),
                float((after - base).mean()),
            )
            if not np.isfinite(after).all():
                raise ValueError(
                    f"query {q}: the unlearned model gives non-finite losses; lower step_size "
                    "or raise damping"
                )
            out[q] = (after - base).max(axis=0)
            adv(1)
    return out
