"""The three head families of the paper, with the authors' parameter names, and FastGDA's
shared MLP.

State-dict keys match the authors' `networks.py` mappers exactly (`weight`/`bias`, `weights`,
and an `nn.Sequential` for the MLP), so their `.pth` checkpoints load without renaming.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping

import torch
from torch import nn


class LinearHead(nn.Linear):
    """D -> D affine map, initialised to the identity so training starts from the backbone."""

    def __init__(self, dim: int):
        super().__init__(dim, dim)
        with torch.no_grad():
            self.weight.copy_(torch.eye(dim))
            self.bias.zero_()


class ChannelHead(nn.Module):
    """Per-channel rescaling (an ablation in the paper)."""

    def __init__(self, dim: int):
        super().__init__()
        self.weights = nn.Parameter(torch.ones(1, dim))

    @property
    def out_features(self) -> int:
        return self.weights.shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weights


def mlp_head(
    dim: int, hidden_dim: int = 512, out_dim: int = 256, num_layers: int = 2, dropout: float = 0.0
) -> nn.Sequential:
    """SimCLR-style projector: (Linear, BN, ReLU, Dropout) x (L-1), Linear, BN without affine."""
    layers: list[nn.Module] = []
    for i in range(num_layers):
        d_in = dim if i == 0 else hidden_dim
        last = i == num_layers - 1
        d_out = out_dim if last else hidden_dim
        layers.append(nn.Linear(d_in, d_out, bias=False))
        if last:
            layers.append(nn.BatchNorm1d(d_out, affine=False))
        else:
            layers += [nn.BatchNorm1d(d_out), nn.ReLU(inplace=True), nn.Dropout(dropout)]
    return nn.Sequential(*layers)


class FastGDAHead(nn.Module):
    """FastGDA's feature MLP (Wang et al., NeurIPS 2025, `fastgda/models.py` FCModel):
    (Linear, ReLU, Dropout) per hidden width, then a Linear to `out_dim`; Xavier-uniform
    weights. Their shipped shape: hidden 768-768-768, out 768, dropout 0.1."""

    def __init__(
        self,
        dim: int,
        hidden: tuple[int, ...] = (768, 768, 768),
        out_dim: int = 768,
        dropout: float = 0.1,
    ):
        super().__init__()
        layers: list[nn.Module] = []
        widths = (dim, *hidden)
        for d_in, d_out in itertools.pairwise(widths):
            layers += [nn.Linear(d_in, d_out), nn.ReLU(), nn.Dropout(dropout)]
        layers.append(nn.Linear(widths[-1], out_dim))
        self.net = nn.Sequential(*layers)
        for p in self.parameters():
            if p.ndim > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


HEADS: dict[str, Callable[..., nn.Module]] = {
    "linear": LinearHead,
    "channel": ChannelHead,
    "mlp": mlp_head,
    "fastgda": FastGDAHead,
}


def create_head(kind: str, dim: int, **kwargs) -> nn.Module:
    if kind not in HEADS:
        raise ValueError(f"unknown head {kind!r}; choose from {sorted(HEADS)}")
    return HEADS[kind](dim, **kwargs)


def head_in_out(head: nn.Module) -> tuple[int, int]:
    """Input and output feature dims of a head built by `create_head`."""
    if isinstance(head, ChannelHead):
        return head.out_features, head.out_features
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    return linears[0].in_features, linears[-1].out_features


def infer_head_kind(state_dict: Mapping[str, torch.Tensor]) -> str:
    keys = set(state_dict)
    if keys == {"weights"}:
        return "channel"
    if keys == {"weight", "bias"}:
        return "linear"
    if keys and all(k.startswith("net.") for k in keys):
        return "fastgda"
    if keys and all(k.split(".", 1)[0].isdigit() for k in keys):
        return "mlp"
    raise ValueError(f"state dict keys {sorted(keys)[:6]} match no known head")


def head_from_state_dict(
    state_dict: Mapping[str, torch.Tensor], kind: str | None = None
) -> nn.Module:
    """Build the head `state_dict` belongs to (shapes read from it), loaded and in eval mode."""
    found = infer_head_kind(state_dict)
    if kind is not None and kind != found:
        raise ValueError(f"weights are a {found} head, not {kind}")
    head: nn.Module
    if found == "channel":
        head = ChannelHead(state_dict["weights"].shape[-1])
    elif found == "fastgda":
        weights = [state_dict[k] for k in sorted(state_dict, key=_fastgda_order) if "weight" in k]
        head = FastGDAHead(
            weights[0].shape[1],
            hidden=tuple(w.shape[0] for w in weights[:-1]),
            out_dim=weights[-1].shape[0],
        )
    elif found == "linear":
        out_dim, in_dim = state_dict["weight"].shape
        if out_dim != in_dim:
            raise ValueError(f"linear head weight is {out_dim}x{in_dim}, expected square")
        head = LinearHead(in_dim)
    else:
        weights = [
            state_dict[k] for k in sorted(state_dict, key=_layer_order) if _is_linear(k, state_dict)
        ]
        head = mlp_head(
            weights[0].shape[1],
            hidden_dim=weights[0].shape[0],
            out_dim=weights[-1].shape[0],
            num_layers=len(weights),
        )
    head.load_state_dict(dict(state_dict))
    return head.eval()


def _fastgda_order(key: str) -> int:
    return int(key.split(".")[1])


def _layer_order(key: str) -> int:
    return int(key.split(".", 1)[0])


def _is_linear(key: str, state_dict: Mapping[str, torch.Tensor]) -> bool:
    return key.endswith(".weight") and state_dict[key].ndim == 2
