"""Feature matrices as every stage reads them: blocks of a (maybe memory-mapped) array, mapped
by a head and L2-normalised for cosine similarity."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Union

import numpy as np
import torch

from genattr.errors import GenattrError

if TYPE_CHECKING:
    from genattr.store.embedding_store import ShardedVectors

# A (count, dim) matrix: a tensor, a (maybe memory-mapped) array, or a store's sharded vectors.
# Union[...] because ShardedVectors is imported for type checking only (no import cycle).
FeatureMatrix = Union[torch.Tensor, np.ndarray, "ShardedVectors"]
Transform = Callable[[torch.Tensor], torch.Tensor]


def read_block(feats: FeatureMatrix, start: int, stop: int, device: torch.device) -> torch.Tensor:
    """Rows start:stop as fp32 on `device` (fp16 storage is cast; accumulation is fp32)."""
    block = feats[start:stop]
    if isinstance(block, np.ndarray):  # a copy: memory-mapped pages are read-only
        block = torch.from_numpy(np.array(block, dtype=np.float32))
    return block.to(device=device, dtype=torch.float32)


def require_finite(block: torch.Tensor, start: int, name: str) -> None:
    """A NaN or Inf feature would rank first for every query (or turn every score NaN): refuse
    it where features are read, naming the row."""
    bad = ~torch.isfinite(block)
    if bad.any():
        row = int(bad.any(1).nonzero()[0].item()) + start
        raise GenattrError(f"{name}: row {row} has NaN or Inf values")


def embed(x: torch.Tensor, transform: Transform | None) -> torch.Tensor:
    """Apply a head (if any) and L2-normalise: the space where dot product is cosine."""
    if transform is not None:
        x = transform(x).float()
    return torch.nn.functional.normalize(x, dim=-1)
