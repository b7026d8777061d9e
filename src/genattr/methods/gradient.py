"""Gradient attribution (TRAK / D-TRAK family): per-image gradients of a fixed model output,
randomly projected.

For each training image, the gradient of one model output (the denoising loss, or D-TRAK's
squared norm of the UNet's output) with respect to a chosen parameter set, summed over a few
fixed timesteps, then projected to `proj_dim` dimensions by a seeded sparse Johnson-Lindenstrauss
map. TRAK treats the model output as one fixed function of (image, parameters): the timesteps
and the noises are therefore drawn once, from the seed alone, and every image (training image
or query) sees the same ones; per-image random noise would add a different random function to
each gradient and the inner products between images would compare noise, not data.

Algorithm layer: in-memory objects only (a diffusers UNet, its scheduler, latents and text
hidden states); the VAE and the text encoder stay with the caller.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Annotated, Any, Literal, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from genattr.progress import progress_bar
from genattr.vectors import FeatureMatrix, read_block

ParamSet = Literal["cross_attn_kv", "all"]
PARAM_SETS: tuple[str, ...] = ("cross_attn_kv", "all")
DEFAULT_N_TIMESTEPS = 4
# independent random streams derived from one user seed (noises vs projection)
_NOISE_STREAM = 1
_PROJECTION_STREAM = 2


def derived_seed(seed: int, stream: int) -> int:
    """A 63-bit torch seed for `stream`, a fixed function of (seed, stream) on every machine."""
    state = np.random.SeedSequence([seed, stream]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def select_parameters(unet: torch.nn.Module, which: str = "cross_attn_kv") -> list[tuple[str, Any]]:
    """The parameters a gradient is taken with respect to, in the UNet's module order.

    `cross_attn_kv`: Custom Diffusion's set, the key and value weights (`to_k.weight`,
    `to_v.weight`) of every cross-attention layer (`attn2` in SD's UNet2DConditionModel), or
    of its Custom Diffusion processor where one is installed (a customized model).
    `all`: every UNet parameter with `requires_grad`."""
    if which == "cross_attn_kv":
        chosen = []
        for name, m in unet.named_modules():
            if not (getattr(m, "is_cross_attention", False) and hasattr(m, "to_k")):
                continue
            # A customized model (`load_custom_diffusion`) computes keys and values with its
            # Custom Diffusion processor's own layers; the layer's to_k/to_v are then unused
            # and their gradient is zero.
            proc: Any = getattr(m, "processor", None)
            if getattr(proc, "train_kv", False) and hasattr(proc, "to_k_custom_diffusion"):
                k, v = proc.to_k_custom_diffusion, proc.to_v_custom_diffusion
                chosen.append((f"{name}.processor.to_k_custom_diffusion.weight", k.weight))
                chosen.append((f"{name}.processor.to_v_custom_diffusion.weight", v.weight))
            else:
                chosen.append((f"{name}.to_k.weight", m.to_k.weight))
                chosen.append((f"{name}.to_v.weight", m.to_v.weight))
    elif which == "all":
        chosen = [(n, p) for n, p in unet.named_parameters() if p.requires_grad]
    else:
        raise ValueError(f"unknown parameter set {which!r}; known: {list(PARAM_SETS)}")
    if not chosen:
        raise ValueError(f"parameter set {which!r} selects no parameter of this UNet")
    return chosen


class GradientSpec(BaseModel):
    """What a gradient is taken of, and how it is projected; checked when built.

    `timesteps`: the fixed timesteps (None: 4 spread over the scheduler's training schedule,
    the centres of 4 equal strata, e.g. 125, 375, 625, 875 of 1000). `seed`: the noises and the
    projection derive from it alone. `output`: `loss` (the denoising MSE against the
    scheduler's target) or `square_norm` (D-TRAK's mean of the squared UNet output)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    timesteps: Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)] | None = None
    seed: int = 0
    proj_dim: Annotated[int, Field(ge=1)] = 2048
    nnz: Annotated[int, Field(ge=1)] = 4
    params: ParamSet = "cross_attn_kv"
    output: Literal["loss", "square_norm"] = "loss"


class TimestepsAndSeed(Protocol):
    """What `spec_timesteps` and `fixed_noises` read from a spec (a `GradientSpec`, or another
    method's spec that shares the same fixed timesteps and noises)."""

    @property
    def timesteps(self) -> list[int] | None: ...

    @property
    def seed(self) -> int: ...


def spec_timesteps(spec: TimestepsAndSeed, num_train_timesteps: int) -> list[int]:
    """The spec's timesteps for a schedule of `num_train_timesteps` steps."""
    if spec.timesteps is None:
        k = DEFAULT_N_TIMESTEPS
        return [(2 * i + 1) * num_train_timesteps // (2 * k) for i in range(k)]
    bad = [t for t in spec.timesteps if t >= num_train_timesteps]
    if bad:
        raise ValueError(f"timesteps {bad} outside the schedule's 0..{num_train_timesteps - 1}")
    return list(spec.timesteps)


def fixed_noises(spec: TimestepsAndSeed, latent_shape: tuple[int, ...], k: int) -> torch.Tensor:
    """The `k` noises (k, *latent_shape), float32 on the CPU, shared by every image: a fixed
    function of the seed and the latent shape."""
    gen = torch.Generator().manual_seed(derived_seed(spec.seed, _NOISE_STREAM))
    return torch.randn((k, *latent_shape), generator=gen, dtype=torch.float32)


@contextlib.contextmanager
def grad_only(unet: torch.nn.Module, params: list[torch.Tensor]) -> Iterator[None]:
    """Within: eval mode and `requires_grad` on `params` only (so no graph is kept for the
    rest); afterwards both restored."""
    flags = [(p, p.requires_grad) for p in unet.parameters()]
    training = unet.training
    chosen = {id(p) for p in params}
    try:
        unet.eval()
        for p, _ in flags:
            p.requires_grad_(id(p) in chosen)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        unet.train(training)


def check_latents_and_text(latents: torch.Tensor, text_embeddings: torch.Tensor) -> None:
    """`ValueError` unless latents are (N, C, H, W) and text hidden states (N, L, D), same N."""
    if latents.ndim != 4 or text_embeddings.ndim != 3:
        raise ValueError(
            f"latents must be (N, C, H, W) and text_embeddings (N, L, D); got "
            f"{tuple(latents.shape)} and {tuple(text_embeddings.shape)}"
        )
    if len(latents) != len(text_embeddings):
        raise ValueError(f"{len(latents)} latents but {len(text_embeddings)} text embeddings")


def denoising_outputs(
    unet: Any,
    scheduler: Any,
    latents: torch.Tensor,
    text: torch.Tensor,
    *,
    timesteps: torch.Tensor,
    noises: torch.Tensor,
    output: str = "loss",
) -> torch.Tensor:
    """(B, k) float32: each of B images' model output at each of k (timestep, noise) pairs, in
    one UNet call of batch B*k (the UNet treats batch items independently, so each entry is
    the single-step output). `loss`: the denoising MSE, mean over latent elements, against the
    scheduler's target (the noise, or the velocity for `v_prediction`), as training computes
    it; `square_norm`: D-TRAK's mean of the squared UNet output. Every image sees the same k
    pairs: this is the one definition the gradient and unlearning attributors share.

    Args:
        unet: The denoising UNet.
        scheduler: The noise scheduler (adds the noise; gives the target).
        latents: The B images' latents, (B, C, H, W).
        text: The B images' text embeddings, (B, L, D).
        timesteps: The k timesteps, (k,).
        noises: The k noises, (k, C, H, W), one per timestep.
        output: What to return per pair: 'loss' or 'square_norm'.
    """
    b, k = len(latents), len(timesteps)
    shape = tuple(latents.shape[1:])
    x0 = latents.unsqueeze(1).expand(b, k, *shape).reshape(b * k, *shape)
    eps = noises.unsqueeze(0).expand(b, k, *shape).reshape(b * k, *shape)
    ts = timesteps.repeat(b)
    noisy = scheduler.add_noise(x0, eps, ts)
    cond = text.unsqueeze(1).expand(b, k, *text.shape[1:]).reshape(b * k, *text.shape[1:])
    pred = unet(noisy, ts, cond).sample.float()
    if output == "square_norm":
        per_step = pred.pow(2).mean(dim=(1, 2, 3))
    else:
        if scheduler.config.prediction_type == "v_prediction":
            target = scheduler.get_velocity(x0, eps, ts)
        else:
            target = eps
        per_step = F.mse_loss(pred, target.float(), reduction="none").mean(dim=(1, 2, 3))
    return per_step.reshape(b, k)


def iter_gradients(
    unet: Any,
    scheduler: Any,
    latents: torch.Tensor,
    text_embeddings: torch.Tensor,
    spec: GradientSpec,
    *,
    batch_size: int = 8,
) -> Iterator[torch.Tensor]:
    """Each image's flat gradient (float32, CPU), in order. Where every selected weight is a
    bias-free linear layer's (`cross_attn_kv`), `batch_size` images share one forward and
    one backward pass (`_linear_batch_gradients`); otherwise one image at a time, memory
    holding one image's graph (at the spec's timesteps) and one gradient."""
    check_latents_and_text(latents, text_embeddings)
    chosen = select_parameters(unet, spec.params)
    params = [p for _, p in chosen]
    ts = spec_timesteps(spec, scheduler.config.num_train_timesteps)
    device, dtype = params[0].device, params[0].dtype
    noises = fixed_noises(spec, tuple(latents.shape[1:]), len(ts)).to(device, dtype)
    timesteps = torch.tensor(ts, dtype=torch.long, device=device)
    linears = _linear_layers(unet, chosen)
    step = batch_size if linears is not None else 1
    with grad_only(unet, params):
        for s in range(0, len(latents), step):
            lat = latents[s : s + step].to(device, dtype)
            txt = text_embeddings[s : s + step].to(device, dtype)

            def output(lat: torch.Tensor = lat, txt: torch.Tensor = txt) -> torch.Tensor:
                return denoising_outputs(
                    unet, scheduler, lat, txt, timesteps=timesteps, noises=noises,
                    output=spec.output,
                ).sum()  # fmt: skip

            if linears is not None:
                yield from _linear_batch_gradients(output, linears, len(lat)).float().cpu()
            else:
                grads = torch.autograd.grad(output(), params)
                yield torch.cat([g.reshape(-1) for g in grads]).float().cpu()


def _linear_layers(unet: Any, chosen: list[tuple[str, Any]]) -> list[torch.nn.Linear] | None:
    """The linear layer owning each selected weight, or None unless every one is the weight
    of a bias-free `nn.Linear` (then per-image gradients come from one batched pass)."""
    layers: list[torch.nn.Linear] = []
    for name, p in chosen:
        module = (
            unet.get_submodule(name.removesuffix(".weight")) if name.endswith(".weight") else None
        )
        if (
            not isinstance(module, torch.nn.Linear)
            or module.weight is not p
            or module.bias is not None
        ):
            return None
        layers.append(module)
    return layers


def _linear_batch_gradients(
    output: Any, linears: list[torch.nn.Linear], images: int
) -> torch.Tensor:
    """(images, n_params): each image's gradient of `output()` (a sum over the images' own,
    independent outputs) w.r.t. the linear layers' weights, flattened as `select_parameters`
    orders them. A linear layer's weight gradient is, per image, the sum over its rows
    (tokens, timesteps) of grad_output^T input; one backward pass w.r.t. the layers' outputs
    gives every image's grad_output, and no parameter gradient is ever summed over images
    (the per-sample trick; exact up to float rounding)."""
    seen: dict[torch.nn.Linear, list[tuple[torch.Tensor, torch.Tensor]]] = {m: [] for m in linears}

    def record(module: Any, args: tuple[Any, ...], out: torch.Tensor) -> None:
        seen[module].append((args[0].detach(), out))

    handles = [m.register_forward_hook(record) for m in linears]
    try:
        total = output()
    finally:
        for h in handles:
            h.remove()
    calls = [(x, y) for m in linears for x, y in seen[m]]
    grads = iter(torch.autograd.grad(total, [y for _, y in calls]))
    flat = []
    for m in linears:
        weight = torch.zeros((images, *m.weight.shape), dtype=torch.float32, device=m.weight.device)
        for x, _ in seen[m]:  # a layer called several times adds up
            gy = next(grads)
            weight += torch.einsum(
                "bto,bti->boi",
                gy.reshape(images, -1, gy.shape[-1]).float(),
                x.reshape(images, -1, x.shape[-1]).float(),
            )
        flat.append(weight.reshape(images, -1))
    return torch.cat(flat, dim=1)


def loss_gradients(
    unet: Any,
    scheduler: Any,
    latents: torch.Tensor,
    text_embeddings: torch.Tensor,
    spec: GradientSpec,
) -> torch.Tensor:
    """(N, n_params) float32 CPU: per image, the gradient of the spec's output summed over its
    timesteps, w.r.t. the selected parameters flattened in `select_parameters` order."""
    return torch.stack(list(iter_gradients(unet, scheduler, latents, text_embeddings, spec)))


class SparseProjection:
    """A seeded sparse Johnson-Lindenstrauss map R^n_params -> R^proj_dim (y = x @ P).

    Each input coordinate goes to `nnz` output coordinates, one in each of `nnz` equal blocks
    of the output (so they are distinct), with random signs, scaled by 1/sqrt(nnz): E|y|^2 =
    |x|^2. Holds only the (n_params, nnz) indices (int32) and signs (int8); applying it adds
    into the output blockwise with `index_add_`, never building the dense matrix. The same
    (n_params, proj_dim, nnz, seed) give the same map in any process."""

    def __init__(
        self, n_params: int, proj_dim: int, seed: int, nnz: int = 4, block: int = 1 << 20
    ) -> None:
        if n_params < 1 or proj_dim < 1 or nnz < 1 or block < 1:
            raise ValueError("n_params, proj_dim, nnz and block must be positive")
        if proj_dim % nnz:
            raise ValueError(f"proj_dim {proj_dim} must be a multiple of nnz {nnz}")
        if proj_dim > np.iinfo(np.int32).max:
            raise ValueError(f"proj_dim {proj_dim} too large")
        self.n_params, self.proj_dim, self.nnz, self.seed, self.block = (
            n_params,
            proj_dim,
            nnz,
            seed,
            block,
        )
        self.scale = 1.0 / math.sqrt(nnz)
        width = proj_dim // nnz
        gen = torch.Generator().manual_seed(derived_seed(seed, _PROJECTION_STREAM))
        offsets = torch.arange(nnz, dtype=torch.int32) * width
        self.indices = torch.randint(0, width, (n_params, nnz), generator=gen, dtype=torch.int32)
        self.indices += offsets
        self.signs = torch.randint(0, 2, (n_params, nnz), generator=gen, dtype=torch.int8)
        self.signs.mul_(2).sub_(1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Project (n_params,) -> (proj_dim,) or (B, n_params) -> (B, proj_dim), float32."""
        if x.shape[-1] != self.n_params or x.ndim not in (1, 2):
            raise ValueError(
                f"expected (..., {self.n_params}) with 1 or 2 dims; got {tuple(x.shape)}"
            )
        x = x.float()
        out = torch.zeros((*x.shape[:-1], self.proj_dim), dtype=torch.float32, device=x.device)
        for b in range(0, self.n_params, self.block):
            e = min(b + self.block, self.n_params)
            idx = self.indices[b:e].to(x.device).reshape(-1)
            signs = self.signs[b:e].to(x.device, torch.float32) * self.scale
            contrib = x[..., b:e, None] * signs  # (..., blk, nnz)
            out.index_add_(-1, idx, contrib.reshape(*x.shape[:-1], -1))
        return out

    def dense(self, max_entries: int = 10**8) -> torch.Tensor:
        """The (n_params, proj_dim) matrix P, for tests on small sizes only."""
        if self.n_params * self.proj_dim > max_entries:
            raise ValueError(
                f"dense projection of {self.n_params} x {self.proj_dim} exceeds {max_entries} "
                "entries"
            )
        mat = torch.zeros((self.n_params, self.proj_dim), dtype=torch.float32)
        rows = torch.arange(self.n_params).unsqueeze(1).expand(-1, self.nnz)
        vals = self.signs.float() * self.scale
        mat.index_put_(
            (rows.reshape(-1), self.indices.long().reshape(-1)), vals.reshape(-1), accumulate=True
        )
        return mat


def projected_gradients(
    unet: Any,
    scheduler: Any,
    latents: torch.Tensor,
    text_embeddings: torch.Tensor,
    spec: GradientSpec,
    *,
    projection: SparseProjection | None = None,
    progress: bool = False,
) -> np.ndarray:
    """(N, proj_dim) float32: each image's gradient (as `loss_gradients`) times the spec's
    projection, one image at a time, so no full gradient outlives its image."""
    n_params = sum(p.numel() for _, p in select_parameters(unet, spec.params))
    if projection is None:
        projection = SparseProjection(n_params, spec.proj_dim, spec.seed, nnz=spec.nnz)
    elif (projection.n_params, projection.proj_dim) != (n_params, spec.proj_dim):
        raise ValueError(
            f"projection maps {projection.n_params} -> {projection.proj_dim}; this spec needs "
            f"{n_params} -> {spec.proj_dim}"
        )
    out = np.zeros((len(latents), spec.proj_dim), dtype=np.float32)
    with progress_bar("gradients", len(latents), enabled=progress) as advance:
        grads = iter_gradients(unet, scheduler, latents, text_embeddings, spec)
        for i, g in enumerate(grads):
            out[i] = projection(g).numpy()
            advance(1)
    return out


def damped_gram(
    train: FeatureMatrix, damping: float = 1e-3, block_rows: int = 65536
) -> torch.Tensor:
    """TRAK's Phi^T Phi + lambda I in float64, Phi the training gradients read block by block
    (memory: proj_dim x proj_dim, whatever N); lambda is `damping` times the mean of
    Phi^T Phi's diagonal."""
    if not (math.isfinite(damping) and damping > 0):
        raise ValueError(f"damping must be a positive number, not {damping}")
    cpu, dim = torch.device("cpu"), train.shape[1]
    gram = torch.zeros((dim, dim), dtype=torch.float64)
    for start in range(0, len(train), block_rows):
        block = read_block(train, start, start + block_rows, cpu).double()
        gram += block.T @ block
    return gram + damping * float(gram.diagonal().mean()) * torch.eye(dim, dtype=torch.float64)


def gradient_scores(
    train: FeatureMatrix,
    queries: np.ndarray | torch.Tensor,
    kernel: Literal["cosine", "trak"] = "cosine",
    damping: float = 1e-3,
    block_rows: int = 65536,
    *,
    gram: torch.Tensor | None = None,
) -> np.ndarray:
    """(Q, N) attribution scores of each query's projected gradient against each training
    image's, read block by block from `train` (an array, tensor or a store's vectors).

    `cosine`: normalised inner products. `trak`: TRAK's kernel correction,
    q (Phi^T Phi + lambda I)^-1 phi_i with Phi the training gradients, so directions every
    training image's gradient shares stop dominating; lambda is `damping` times the mean of
    Phi^T Phi's diagonal. The Gram matrix is accumulated in float64 over blocks: memory is
    (proj_dim x proj_dim), whatever N. `gram`: `damped_gram(train, damping)` when the
    caller already has it (scoring several query batches against one training set)."""
    if kernel not in ("cosine", "trak"):
        raise ValueError(f"kernel must be cosine or trak, not {kernel!r}")
    if not (math.isfinite(damping) and damping > 0):
        raise ValueError(f"damping must be a positive number, not {damping}")
    cpu = torch.device("cpu")
    q = torch.as_tensor(np.asarray(queries), dtype=torch.float32)
    n, dim = len(train), train.shape[1]
    if q.ndim != 2 or q.shape[1] != dim:
        raise ValueError(f"queries must be (Q, {dim}); got {tuple(q.shape)}")
    if kernel == "cosine":
        q = F.normalize(q, dim=1)
    else:
        if gram is None:
            gram = damped_gram(train, damping, block_rows)
        elif gram.shape != (dim, dim):
            raise ValueError(f"gram must be ({dim}, {dim}); got {tuple(gram.shape)}")
        q = torch.linalg.solve(gram, q.double().T).T.float()  # the Gram matrix is symmetric
    out = np.empty((len(q), n), dtype=np.float32)
    for start in range(0, n, block_rows):
        block = read_block(train, start, start + block_rows, cpu)
        if kernel == "cosine":
            block = F.normalize(block, dim=1)
        out[:, start : start + len(block)] = (q @ block.T).numpy()
    return out
