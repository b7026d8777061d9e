"""Image in, ranked training images with influence scores out: the user's main question.

A generated image is embedded the way the gallery was (the backbone and head recorded in the
index), its nearest training images are fetched, and the calibrator turns their similarities
into influence: fractions that sum to 1 over the whole gallery, as in the authors' demo. With a
negative calibrator bias only images within a similarity cutoff of the best match carry mass,
so candidates are fetched until one falls below the cutoff; then the normalisation, and every
influence, is exact (with a flat index; IVF candidates are approximate and say so).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from PIL import Image

from genattr.calibrate import Calibrator, load_calibrator
from genattr.data.images import ImageDecodeError, load_rgb
from genattr.devices import resolve_device
from genattr.errors import GenattrError
from genattr.features.embedder import embed_images
from genattr.features.registry import Backbone, get_backbone
from genattr.heads.checkpoint import MapperPair
from genattr.search.index import AttributionIndex
from genattr.vectors import embed


@dataclass
class AttributedImage:
    rank: int
    id: str
    path: str
    similarity: float
    influence: float | None


@dataclass
class Attribution:
    query: str
    results: list[AttributedImage]
    remaining_influence: float | None
    exact: bool = True
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


def load_query_image(path: str | os.PathLike):
    """Open a generated image as RGB (alpha composited on white), or fail naming the file.

    The same decoding and decompression-bomb guard as extraction (`load_rgb`)."""
    if not os.path.exists(path):
        raise GenattrError(f"{path}: no such file")
    try:
        return load_rgb(path)
    except ImageDecodeError as e:
        raise GenattrError(f"{path}: cannot read as an image ({e})") from None


def backbone_for_index(index: AttributionIndex, weights: str | None, device: str) -> Backbone:
    """The backbone the gallery was embedded with (as the index records), checked by weights id,
    on `device`."""
    recorded = index.meta.get("backbone")
    if not recorded:
        raise GenattrError(f"{index.path}: the index records no backbone; pass one explicitly")
    backbone = get_backbone(
        recorded["name"], weights or recorded.get("weights_path"), device=device
    )
    want = recorded.get("weights_id")
    if want and backbone.weights_id != want:
        raise GenattrError(
            f"{index.path}: built with {recorded['name']} weights {want}, but the weights found "
            f"are {backbone.weights_id}; pass --weights with the file the gallery was made with"
        )
    return backbone


def embed_queries(
    images: Sequence[str | os.PathLike | Image.Image],
    backbone: Backbone,
    head: MapperPair | None,
    batch_size: int = 16,
) -> np.ndarray:
    """Backbone features of the images through the synth head, normalised: (Q, D) numpy.

    Paths are opened here; RGB images already decoded (the web service's uploads) go as they
    are. Features come back to the CPU (`embed_images`), where the head runs."""
    decoded = [im if isinstance(im, Image.Image) else load_query_image(im) for im in images]
    feats = torch.from_numpy(embed_images(backbone, decoded, batch_size=batch_size))
    with torch.no_grad():
        return embed(feats, None if head is None else head.synth.cpu().eval()).numpy()


class Attributor:
    """Index, calibrator, backbone and head, loaded once: images in, attributions out.

    `genattr attribute`, the web service and the demo all answer through one of these; a new
    attribution method is another object with the same `attribute` (images in, scores over
    the gallery out)."""

    def __init__(
        self,
        index: AttributionIndex,
        calibrator: Calibrator | None = None,
        backbone: Backbone | None = None,
        *,
        weights: str | None = None,
        device: str = "cpu",
        batch_size: int = 16,
    ) -> None:
        self.index = index
        self.calibrator = calibrator
        self.backbone = backbone or backbone_for_index(index, weights, resolve_device(device))
        self.backbone.model.eval()
        self.head = index.head()
        self.gallery = index.metadata()
        self.batch_size = batch_size

    @classmethod
    def load(
        cls,
        index: str | os.PathLike,
        calibrator: str | os.PathLike | None = None,
        *,
        weights: str | None = None,
        device: str = "cpu",
        batch_size: int = 16,
    ) -> Attributor:
        """From an index folder (`genattr index build`) and a calibrator file."""
        resolve_device(device)  # before anything is read
        return cls(
            AttributionIndex.load(index),
            None if calibrator is None else load_calibrator(calibrator),
            weights=weights,
            device=device,
            batch_size=batch_size,
        )

    def embed(self, images: Sequence[str | os.PathLike | Image.Image]) -> np.ndarray:
        """Query vectors in the index's space: backbone, synth head, L2-normalised."""
        return embed_queries(list(images), self.backbone, self.head, self.batch_size)

    def attribute(
        self,
        images: Sequence[str | os.PathLike | Image.Image],
        top_k: int | Sequence[int] = 20,
        names: Sequence[str] | None = None,
    ) -> list[Attribution]:
        """Which training images made each image, and how much (`top_k` per image or one)."""
        top_ks = [top_k] * len(images) if isinstance(top_k, int) else list(top_k)
        if any(k < 1 for k in top_ks):
            raise GenattrError(f"--top-k must be at least 1, got {min(top_ks)}")
        if names is None:
            names = [
                str(im) if not isinstance(im, Image.Image) else f"image {i}"
                for i, im in enumerate(images)
            ]
        return attribute_vectors(
            names, self.embed(images), self.index, self.calibrator, top_ks, gallery=self.gallery
        )


def attribute(
    images: Sequence[str | os.PathLike],
    index: str | os.PathLike | AttributionIndex,
    calibrator: str | os.PathLike | Calibrator | None = None,
    top_k: int = 20,
    *,
    backbone: Backbone | None = None,
    weights: str | None = None,
    device: str = "cpu",
) -> list[Attribution]:
    """Which training images made each of these images, and how much (one `Attributor` call)."""
    if top_k < 1:
        raise GenattrError(f"--top-k must be at least 1, got {top_k}")
    resolve_device(device)  # before anything is read
    if not isinstance(index, AttributionIndex):
        index = AttributionIndex.load(index)
    if calibrator is not None and not isinstance(calibrator, Calibrator):
        calibrator = load_calibrator(calibrator)
    return Attributor(index, calibrator, backbone, weights=weights, device=device).attribute(
        list(images), top_k
    )


def _influence(
    index: AttributionIndex,
    query: np.ndarray,
    cal: Calibrator | None,
    found: tuple[np.ndarray, np.ndarray],
):
    """Fetch candidates until the calibrator's cutoff is passed; return sims, ids, p, exact.
    `found`: the query's (sims, ids) from the first search, made for a batch of queries."""
    sims, ids = found
    k = len(ids)
    while True:
        keep = ids >= 0
        sims, ids = sims[keep], ids[keep]
        if cal is None:
            return sims, ids, None, True
        cutoff = cal.similarity_cutoff(float(sims[0]))
        if sims[-1] < cutoff or k >= index.count:
            break
        k = min(index.count, k * 4 if np.isfinite(cutoff) else index.count)
        sims, ids = (row[0] for row in index.search(query[None], k))
    p = cal.probabilities(sims)
    return sims, ids, p, index.spec.exact


def attribute_vectors(
    names: Sequence[str],
    vectors: np.ndarray,
    index: AttributionIndex,
    calibrator: Calibrator | None,
    top_ks: Sequence[int],
    *,
    gallery: tuple[list[str], list[str]] | None = None,
) -> list[Attribution]:
    """Answers for embedded queries (`embed_queries`), each with its own top K. One search
    fetches every query's first candidates (a pass over the gallery serves the whole batch);
    `gallery` is `index.metadata()`, which a long-lived caller (the web service) reads once.

    Args:
        names: One name per query, carried into its `Attribution`.
        vectors: The embedded queries, one row per query (as `embed_queries` returns them).
        index: The gallery index to search.
        calibrator: Turns similarities into influence; None gives similarities only.
        top_ks: How many gallery images to return for each query (one per query).
        gallery: The gallery's (ids, paths) as `index.metadata()` returns them; read from
            the index when None.
    """
    gallery_ids, gallery_paths = index.metadata() if gallery is None else gallery
    first_sims, first_ids = index.search(vectors, min(index.count, max(*top_ks, 64)))
    answers = []
    for name, q, top_k, found in zip(
        names, vectors, top_ks, zip(first_sims, first_ids, strict=True), strict=True
    ):
        sims, ids, p, exact = _influence(index, q, calibrator, found)
        results = [
            AttributedImage(
                rank=r + 1,
                id=gallery_ids[i],
                path=gallery_paths[i],
                similarity=float(sims[r]),
                influence=None if p is None else float(p[r]),
            )
            for r, i in enumerate(ids[:top_k])
        ]
        notes = []
        remaining = None
        if p is None:
            notes.append("no calibrator: similarities only, no influence")
        else:
            remaining = float(max(0.0, 1.0 - p[:top_k].sum()))
            if not exact:
                notes.append("influence normalised over approximate (IVF) candidates: estimated")
        answers.append(Attribution(name, results, remaining, exact and p is not None, notes))
    return answers
