"""Exact top-k by cosine similarity over a gallery streamed in blocks.

The gallery may be a memory-mapped fp16 array; it is read once, mapped (a head) and
normalised block by block, and only a (Q, k) running best list is kept.
"""

from __future__ import annotations

import numpy as np
import torch

from genattr.vectors import FeatureMatrix, Transform, embed, read_block, require_finite


def topk_exact(
    gallery: FeatureMatrix,
    queries: torch.Tensor,
    k: int,
    *,
    gallery_transform: Transform | None = None,
    block_rows: int = 65536,
    gallery_name: str = "gallery",
) -> tuple[np.ndarray, np.ndarray]:
    """(Q, k) similarities, best first, and their gallery row indices.

    queries must already be mapped and normalised; k is capped at the gallery size.
    """
    k = min(k, len(gallery))
    best_s = torch.full((len(queries), k), -torch.inf)
    best_i = torch.zeros((len(queries), k), dtype=torch.int64)
    with torch.no_grad():
        for g0 in range(0, len(gallery), block_rows):
            raw = read_block(gallery, g0, g0 + block_rows, queries.device)
            require_finite(raw, g0, gallery_name)
            block = embed(raw, gallery_transform)
            scores = queries @ block.T
            s, i = scores.topk(min(k, scores.shape[1]), dim=1)
            merged_s = torch.cat([best_s, s], dim=1)
            merged_i = torch.cat([best_i, i + g0], dim=1)
            best_s, pos = merged_s.topk(k, dim=1)
            best_i = merged_i.gather(1, pos)
    return best_s.numpy(), best_i.numpy()
