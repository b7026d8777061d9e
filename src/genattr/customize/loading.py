"""Loading Custom Diffusion models into a pipeline, and checking that they took effect.

diffusers 0.42.1's `unet.load_attn_procs(dir, weight_name=...)` returns without installing the
processors unless a pipeline is passed (diffusers issue #9320): the UNet keeps its attention
processors and the outputs silently stay those of the base model. This loader installs them
itself and then reads them back from the UNet, so a model that did not load is an error.

Accepted weight files (`.bin`, `.safetensors`, `.pt`, `.ckpt`):
- diffusers' Custom Diffusion format: `<layer>.processor.to_k_custom_diffusion.weight`, ...;
- plain UNet keys, as loaded with `unet.load_state_dict(sd, strict=False)`:
  `<layer>.to_k.weight`, `<layer>.to_v.weight` (optionally `to_q`, `to_out.0`), with or
  without a `unet.` prefix.
Token embeddings: `<token>.bin` / `<token>.safetensors` holding `{token: tensor[D]}`, one
file per token (a multi-concept model has `<new1>.bin`, `<new2>.bin`, ...: every one is
loaded, in the order of their numbers). A `.bin` may hold safetensors bytes: diffusers'
`train_custom_diffusion.py` writes its token files that way by default.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import safetensors.torch
import torch

from genattr.errors import GenattrError

if TYPE_CHECKING:
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import (
        StableDiffusionPipeline,
    )

WEIGHT_CANDIDATES = (
    "pytorch_custom_diffusion_weights.bin",
    "pytorch_custom_diffusion_weights.safetensors",
)
_PLAIN_KEY = re.compile(r"^(?:unet\.)?(.+)\.(to_k|to_v|to_q|to_out\.0)\.(weight|bias)$")
_CD_KEY = re.compile(r"^(.+\.processor)\.(to_k|to_v|to_q|to_out)_custom_diffusion\.(.+)$")


@dataclass
class LoadReport:
    weights: Path
    layers: list[str]
    tokens: list[str]


def _is_safetensors(path: Path) -> bool:
    """A safetensors file by its content: an 8-byte little-endian header size, then JSON."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9 or head[8:9] != b"{":
        return False
    return 2 <= int.from_bytes(head[:8], "little") <= path.stat().st_size - 8


def _read_state(path: Path) -> dict[str, Any]:
    try:
        if path.suffix == ".safetensors" or _is_safetensors(path):
            return dict(safetensors.torch.load_file(str(path), device="cpu"))

        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt or foreign files: one clear message
        raise GenattrError(f"{path}: cannot read weights ({type(e).__name__}: {e})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise GenattrError(f"{path}: expected a state dict")
    return state


def find_weights(model_dir: str | os.PathLike, weight_name: str | None = None) -> Path:
    """The Custom Diffusion weight file of a model folder (or the file itself)."""
    p = Path(model_dir)
    if p.is_file():
        return p
    if weight_name is not None:
        if not (p / weight_name).is_file():
            raise GenattrError(f"{p / weight_name}: no such file")
        return p / weight_name
    for name in WEIGHT_CANDIDATES:
        if (p / name).is_file():
            return p / name
    raise GenattrError(f"{p}: no Custom Diffusion weights ({' or '.join(WEIGHT_CANDIDATES)})")


def processor_state(state: dict[str, Any], source: str = "weights") -> dict[str, dict[str, Any]]:
    """Group a state dict by attention processor: name -> {'to_k_custom_diffusion.weight': t}."""
    groups: dict[str, dict[str, Any]] = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            continue  # diffusers' empty {} entries for layers that were not trained
        m = _CD_KEY.match(key)
        if m:
            name, proj, rest = m.groups()
            groups.setdefault(name, {})[f"{proj}_custom_diffusion.{rest}"] = value
            continue
        m = _PLAIN_KEY.match(key)
        if m:
            layer, proj, kind = m.groups()
            sub = "to_out_custom_diffusion.0" if proj == "to_out.0" else f"{proj}_custom_diffusion"
            groups.setdefault(f"{layer}.processor", {})[f"{sub}.{kind}"] = value
    if not groups:
        raise GenattrError(f"{source}: no Custom Diffusion attention weights in it")
    return groups


def install_custom_diffusion(unet: Any, groups: dict[str, dict[str, Any]], source: str) -> None:
    """Give each listed attention layer a Custom Diffusion processor with these weights, keep
    every other layer's processor, and verify the UNet now holds exactly these weights."""
    from diffusers.models.attention_processor import (
        CustomDiffusionAttnProcessor,
        CustomDiffusionAttnProcessor2_0,
    )

    current = dict(unet.attn_processors)
    unknown = sorted(set(groups) - set(current))
    if unknown:
        raise GenattrError(
            f"{source}: {len(unknown)} layer(s) not in this UNet (another base model?), "
            f"e.g. {unknown[0]}"
        )
    cls = (
        CustomDiffusionAttnProcessor2_0
        if hasattr(torch.nn.functional, "scaled_dot_product_attention")
        else CustomDiffusionAttnProcessor
    )
    procs = dict(current)
    for name, sd in groups.items():
        train_kv = "to_k_custom_diffusion.weight" in sd
        train_q_out = "to_q_custom_diffusion.weight" in sd
        ref = sd["to_k_custom_diffusion.weight"] if train_kv else sd["to_q_custom_diffusion.weight"]
        hidden = ref.shape[0]
        cross = ref.shape[1] if train_kv else None
        proc = cls(
            train_kv=train_kv,
            train_q_out=train_q_out,
            hidden_size=hidden,
            cross_attention_dim=cross,
            out_bias="to_out_custom_diffusion.0.bias" in sd,
        )
        try:
            proc.load_state_dict(sd)
        except RuntimeError as e:
            raise GenattrError(f"{source}: {name}: {str(e).splitlines()[0]}") from None
        procs[name] = proc.to(device=unet.device, dtype=unet.dtype)
    unet.set_attn_processor(procs)
    # Read back: the processors must be in the UNet, holding the file's weights.
    live = unet.attn_processors
    for name, sd in groups.items():
        proc = live[name]
        if not isinstance(proc, (CustomDiffusionAttnProcessor, CustomDiffusionAttnProcessor2_0)):
            raise GenattrError(f"{source}: {name} did not take the Custom Diffusion processor")
        got = proc.state_dict()
        for key, value in sd.items():
            want = value.to(device=unet.device, dtype=unet.dtype)
            if key not in got or not torch.equal(got[key], want):
                raise GenattrError(f"{source}: {name}.{key} did not take effect")


def load_token_embeddings(pipe: StableDiffusionPipeline, model_dir: Path) -> list[str]:
    """Add every `<token>.bin`/`.safetensors` of the folder to tokenizer and text encoder."""
    tokens = []
    files = sorted(
        (
            p
            for p in model_dir.glob("*")
            if p.suffix in (".bin", ".safetensors") and p.name.startswith("<")
        ),
        key=_natural,
    )
    tok, te = pipe.tokenizer, pipe.text_encoder
    for path in files:
        state = _read_state(path)
        for token, emb in state.items():
            if not isinstance(emb, torch.Tensor):
                continue
            emb = emb.reshape(-1)
            dim = te.get_input_embeddings().weight.shape[1]
            if emb.numel() != dim:
                raise GenattrError(f"{path}: {token} has {emb.numel()} values, the encoder {dim}")
            tid = tok.convert_tokens_to_ids(token)
            if tid is None or tid == tok.unk_token_id:
                tok.add_tokens(token)
                te.resize_token_embeddings(len(tok), mean_resizing=False)
                tid = tok.convert_tokens_to_ids(token)
            weight = te.get_input_embeddings().weight
            with torch.no_grad():
                weight[tid] = emb.to(device=weight.device, dtype=weight.dtype)
            ids = tok.encode(token, add_special_tokens=False)
            if ids != [tid] or not torch.equal(
                weight[tid], emb.to(device=weight.device, dtype=weight.dtype)
            ):
                raise GenattrError(f"{path}: token {token!r} did not take effect")
            tokens.append(token)
    return tokens


def _natural(path: Path) -> tuple:
    """Name order with numbers compared as numbers: `<new2>` before `<new10>`."""
    return tuple(
        (0, int(part), "") if part.isdigit() else (1, 0, part)
        for part in re.split(r"(\d+)", path.name)
    )


def load_custom_diffusion(
    pipe: StableDiffusionPipeline, model_dir: str | os.PathLike, weight_name: str | None = None
) -> LoadReport:
    """Install a Custom Diffusion model (attention weights and token embeddings) into `pipe`."""
    weights = find_weights(model_dir, weight_name)
    groups = processor_state(_read_state(weights), str(weights))
    install_custom_diffusion(pipe.unet, groups, str(weights))
    folder = weights.parent if Path(model_dir).is_file() else Path(model_dir)
    tokens = load_token_embeddings(pipe, folder)
    return LoadReport(weights, sorted(groups), tokens)


def custom_diffusion_unet_state(groups: dict[str, dict[str, torch.Tensor]]) -> dict[str, Any]:
    """The same weights under plain UNet keys (`...attn2.to_k.weight`), for code that loads
    Custom Diffusion deltas with `unet.load_state_dict(sd, strict=False)`."""
    out = {}
    for name, sd in groups.items():
        layer = name[: -len(".processor")]
        for key, value in sd.items():
            proj, rest = key.split("_custom_diffusion.")
            proj = "to_out.0" if proj == "to_out" and rest.startswith("0.") else proj
            rest = rest[2:] if proj == "to_out.0" else rest
            out[f"{layer}.{proj}.{rest}"] = value
    return out
