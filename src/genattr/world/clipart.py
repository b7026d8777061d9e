"""The miniature world's images: Debian's `openclipart-png` (public domain) rendered small.

Built once from the package (`genattr world build-data`) and shipped in the repository
(`genattr/world/data/`), so machines without Debian run the same world. Every image is
composited on white, padded to a square and resized; captions come from the folders and the
file name; the artist is parsed from the file name. Identical files (the package has links and
copies) and identical renderings are kept once. The exemplars of the AbC benchmark (single
images for objects, all images of an artist for styles) are held out of pre-training here, at
build time, with a fixed seed: the `split` column records it.

File names in the package look like `light_bulb_karl_bartel_01.png`: title, artist, number,
with the stem cut at 24 characters (`canguro_architetto_franc_01.png`). The artist is the last
two words of the stem; a cut name is mapped to the longest artist name it is a prefix of.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import warnings
import zipfile
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from genattr.atomic import atomic_path, write_text_atomic
from genattr.errors import GenattrError

logger = logging.getLogger(__name__)

DATA_FORMAT_VERSION = 1
PACKAGE_ROOT = Path("usr/share/openclipart/png")
DEFAULT_DATA_DIR = Path(__file__).parent / "data"
IMAGES_NAME = "clipart{size}.npz"
META_NAME = "clipart{size}.json"
PARSER_VERSION = 5  # bump when names, captions or the hold-out change
STEM_CUT = 24  # the package's file stems are cut at this many characters
_NUMBERED = re.compile(r"^(?P<stem>.+)_(?P<num>\d{2})$")
SPLITS = ("pretrain", "object-exemplar", "unobserved-exemplar", "style-exemplar", "unused")
# The held-out splits: every image of one of them belongs to one customized model.
EXEMPLAR_SPLITS = ("object-exemplar", "unobserved-exemplar", "style-exemplar")
# The pre-training subset and the object exemplars' categories: folders (with their
# sub-folders) of many images of one visually distinct kind. On all 71 folders with 20+ images
# (half of them computer icons and signs) 4 h 25 min of CPU training gave samples that follow
# their caption's colours but not its object.
CURATED_GROUPS = (
    "animals",
    "food/fruit",
    "people/smilies",
    "people/stickmen",
    "recreation/games/cards",
    "shapes/arrows",
    "shapes/jigsaw",
    "shapes/stars",
    "signs and symbols/clocks",
    "signs and symbols/flags",
    "signs and symbols/led",
    "transportation/roadsigns",
)


@dataclass(frozen=True)
class NameParts:
    """What one file's path says: title words, category folders, number, artist tail."""

    title: str  # without the tail: the title if the tail is an artist
    full_title: str  # with the tail: the title if it is not
    categories: tuple[str, ...]
    tail: str | None  # the last two words of a numbered stem: a (possibly cut) artist name
    cut: bool  # the stem has the package's maximum length, so the tail may be cut


def split_name(relpath: str) -> NameParts:
    """Title, categories and artist tail of a package path such as
    `animals/birds/parrot_gerald_g._01.png` (folders below `png/`)."""
    parts = Path(relpath).parts
    categories = tuple(p.lower().replace("_", " ") for p in parts[:-1])
    stem = Path(parts[-1]).stem
    m = _NUMBERED.match(stem)
    tail = None
    cut = False
    title_stem = full_stem = stem
    if m:
        words = m["stem"].split("_")
        cut = len(m["stem"]) >= STEM_CUT
        if len(words) >= 3 and all(re.match(r"[a-z]", w) for w in words[-2:-1]):
            tail = "_".join(words[-2:])
            title_stem = "_".join(words[:-2])
        else:
            title_stem = m["stem"]
        full_stem = m["stem"]
    return NameParts(_title(title_stem), _title(full_stem), categories, tail, cut)


def _title(stem: str) -> str:
    words = re.split(r"[_\-\s]+", stem.lower())
    words = [re.sub(r"[^a-z]", "", w) for w in words]
    words = [w for w in words if len(w) > 1 or w == "a"]
    while words and words[0] in ("a", "an", "the"):
        words = words[1:]
    return " ".join(words)


def resolve_artists(names: Iterable[NameParts]) -> list[str | None]:
    """Artist of each name. A tail seen in two or more files is an artist; a cut tail is the
    longest such artist it is a prefix of (same first word). Tails seen once are taken for
    part of the title ('a_simple_pig_01')."""
    names = list(names)
    counts = Counter(n.tail for n in names if n.tail)
    known = {n.tail for n in names if n.tail and counts[n.tail] >= 2}
    known = {t for t in known if not t.endswith("_")}
    by_first: dict[str, list[str]] = defaultdict(list)
    for t in known:
        by_first[t.split("_")[0]].append(t)
    out: list[str | None] = []
    for n in names:
        if not n.tail:
            out.append(None)
            continue
        first = n.tail.split("_")[0]
        if n.cut:
            longer = [t for t in by_first.get(first, []) if t.startswith(n.tail)]
            if longer:
                out.append(max(longer, key=lambda t: (len(t), counts[t])))
                continue
        out.append(n.tail if n.tail in known else None)
    return out


def article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def caption(title: str, categories: tuple[str, ...]) -> str:
    """'a clipart of a parrot, animals, birds': the title, then the folders, general first."""
    subject = title or (categories[-1] if categories else "thing")
    cats = [c for c in categories if c and c != "unsorted"]
    text = f"a clipart of {article(subject)} {subject}"
    return ", ".join([text, *cats])


def render(data: bytes, size: int) -> np.ndarray:
    """A PNG as uint8 (size, size, 3): alpha composited on white, padded to a square on white,
    resized with an antialiasing filter (thin clip-art lines survive as grey)."""
    with warnings.catch_warnings():  # a few package PNGs are huge (168 Mpx) but genuine
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        im = Image.open(io.BytesIO(data))
    with im:
        im.load()
        rgba = im.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    rgb = Image.alpha_composite(white, rgba).convert("RGB")
    w, h = rgb.size
    s = max(w, h)
    canvas = Image.new("RGB", (s, s), (255, 255, 255))
    canvas.paste(rgb, ((s - w) // 2, (s - h) // 2))
    return np.asarray(canvas.resize((size, size), Image.Resampling.LANCZOS), dtype=np.uint8)


@dataclass
class ClipartData:
    """The shipped world data: images (N, S, S, 3) uint8 and one record per image."""

    images: np.ndarray
    records: list[dict[str, Any]]
    info: dict[str, Any]

    def indices(self, split: str) -> np.ndarray:
        return np.array([i for i, r in enumerate(self.records) if r["split"] == split], int)

    def captions(self, idx: Iterable[int] | None = None) -> list[str]:
        idx = range(len(self.records)) if idx is None else idx
        return [self.records[i]["caption"] for i in idx]

    def models(self) -> dict[str, list[int]]:
        """Held-out model id -> indices of its exemplars (one for objects, all for a style)."""
        out: dict[str, list[int]] = defaultdict(list)
        for i, r in enumerate(self.records):
            if r["model_id"]:
                out[r["model_id"]].append(i)
        return dict(out)


def group_of(folder: str, groups: Iterable[str] = CURATED_GROUPS) -> str | None:
    """The curated group a folder belongs to: the longest group that is it or contains it."""
    inside = [g for g in groups if folder == g or folder.startswith(g + "/")]
    return max(inside, key=len) if inside else None


def choose_holdout(
    records: list[dict[str, Any]],
    seed: int = 0,
    n_objects: int = 64,
    n_styles: int = 24,
    groups: Iterable[str] = CURATED_GROUPS,
    *,
    max_group: int = 200,
    min_left: int = 10,
    style_sizes: tuple[int, int] = (5, 40),
) -> None:
    """Fill `split`, `group` and `model_id` in place. Styles first (every image of the artist,
    wherever it sits), then single object images taken in turn from each curated group while
    more than `min_left` remain in it; the rest of each group (at most `max_group`, so that a
    thousand generated stars do not swamp the rest) is pre-training, other images unused. A
    style needs `style_sizes` images in two or more folders: a two-word tail seen in one folder
    only is more often part of a title ('map_elements') than an artist."""
    rng = np.random.default_rng(seed)
    groups = tuple(groups)
    by_artist: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        if r["artist"]:
            by_artist[r["artist"]].append(i)
    eligible = sorted(
        a
        for a, ix in by_artist.items()
        if style_sizes[0] <= len(ix) <= style_sizes[1]
        and len({records[i]["folder"] for i in ix}) >= 2
    )
    chosen = [eligible[i] for i in sorted(rng.permutation(len(eligible))[:n_styles])]
    for r in records:
        r["split"], r["model_id"] = "unused", None
        r["group"] = group_of(r["folder"], groups)
    for k, a in enumerate(chosen):
        for i in by_artist[a]:
            records[i]["split"], records[i]["model_id"] = "style-exemplar", f"style-{k:03d}"
    pools: dict[str, list[int]] = {g: [] for g in groups}
    for i, r in enumerate(records):
        if r["group"] and r["split"] == "unused":
            pools[r["group"]].append(i)
    for g in pools:
        pools[g] = [pools[g][j] for j in rng.permutation(len(pools[g]))]
    k = 0
    while k < n_objects and any(len(p) > min_left for p in pools.values()):
        for g in groups:
            if k >= n_objects or len(pools[g]) <= min_left:
                continue
            i = pools[g].pop()
            records[i]["split"], records[i]["model_id"] = "object-exemplar", f"object-{k:03d}"
            k += 1
    for ix in pools.values():
        for i in ix[:max_group]:
            records[i]["split"] = "pretrain"


def extend_holdout(
    records: list[dict[str, Any]],
    seed: int = 0,
    n_objects: int = 304,
    n_unobserved: int = 64,
    groups: Iterable[str] = CURATED_GROUPS,
    *,
    style_sizes: tuple[int, int] = (3, 40),
) -> None:
    """More held-out sets from images pre-training never used, in place; pre-training and the
    sets `choose_holdout` made stay as they are, so a base model trained on them stays valid.

    - styles: every artist whose images are all unused, `style_sizes` of them in two or more
      folders (`style-NNN`, numbered on);
    - observed objects: single images from the curated groups' surplus (the images beyond
      `max_group`), in turn from each group, up to `n_objects` object sets in all
      (`object-NNN`, numbered on): new images of kinds the base model was trained on;
    - unobserved objects: single images from folders outside the curated groups, one folder at
      a time in a seeded order (`unobserved-exemplar`, `unobserved-NNN`): kinds the base model
      never saw, the paper's unobserved ImageNet classes.
    """
    rng = np.random.default_rng([seed, 1])
    groups = tuple(groups)
    n_objects_taken = len({r["model_id"] for r in records if r["split"] == "object-exemplar"})
    n_styles = len({r["model_id"] for r in records if r["split"] == "style-exemplar"})
    by_artist: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        if r["artist"]:
            by_artist[r["artist"]].append(i)
    for a in sorted(by_artist):
        ix = by_artist[a]
        if (
            style_sizes[0] <= len(ix) <= style_sizes[1]
            and all(records[i]["split"] == "unused" for i in ix)
            and len({records[i]["folder"] for i in ix}) >= 2
        ):
            for i in ix:
                records[i]["split"], records[i]["model_id"] = (
                    "style-exemplar",
                    f"style-{n_styles:03d}",
                )
            n_styles += 1

    def shuffled_pools(key: str, eligible: Callable[[dict[str, Any]], bool]) -> list[list[int]]:
        pools: dict[str, list[int]] = defaultdict(list)
        for i, r in enumerate(records):
            if r["split"] == "unused" and eligible(r):
                pools[r[key]].append(i)
        return [[pools[k][j] for j in rng.permutation(len(pools[k]))] for k in sorted(pools)]

    def take_in_turn(pools: list[list[int]], n: int, split: str, prefix: str, k: int) -> None:
        while k < n and any(pools):
            for pool in pools:
                if k < n and pool:
                    i = pool.pop()
                    records[i]["split"], records[i]["model_id"] = split, f"{prefix}-{k:03d}"
                    k += 1

    observed = shuffled_pools("group", lambda r: r["group"] in groups)
    take_in_turn(observed, n_objects, "object-exemplar", "object", n_objects_taken)
    unobserved = shuffled_pools(
        "folder", lambda r: r["group"] is None and r["folder"] != "unsorted"
    )
    unobserved = [unobserved[j] for j in rng.permutation(len(unobserved))]
    take_in_turn(unobserved, n_unobserved, "unobserved-exemplar", "unobserved", 0)


def find_package_root(source: str | os.PathLike) -> Path:
    """The `png/` folder of an extracted package (`dpkg-deb -x openclipart-png*.deb DIR`)."""
    src = Path(source)
    for cand in (src / PACKAGE_ROOT, src / "png", src):
        if cand.is_dir() and any(cand.rglob("*.png")):
            return cand
    raise GenattrError(
        f"{src}: no openclipart PNGs found; run `apt-get download openclipart-png && "
        "dpkg-deb -x openclipart-png_*.deb DIR` and pass DIR"
    )


def render_package(
    root: Path, size: int
) -> tuple[np.ndarray, list[dict[str, Any]], dict[str, Any]]:
    """Every distinct image of the package rendered at `size`, with its name-derived record."""
    files = sorted(p for p in root.rglob("*.png") if p.is_file())
    images: list[np.ndarray] = []
    records: list[dict[str, Any]] = []
    seen_files: set[str] = set()
    seen_pixels: set[bytes] = set()
    stats: dict[str, Any] = {"files": len(files), "duplicate_files": 0, "duplicate_renderings": 0}
    skipped: list[dict[str, str]] = []
    for n, p in enumerate(files):
        rel = str(p.relative_to(root))
        data = p.read_bytes()
        digest = hashlib.sha1(data).hexdigest()
        if digest in seen_files:
            stats["duplicate_files"] += 1
            continue
        seen_files.add(digest)
        try:
            arr = render(data, size)
        except Exception as e:  # unreadable files are recorded, not silently dropped
            skipped.append({"source": rel, "error": f"{type(e).__name__}: {e}"})
            continue
        if arr.tobytes() in seen_pixels:
            stats["duplicate_renderings"] += 1
            continue
        seen_pixels.add(arr.tobytes())
        parts = split_name(rel)
        images.append(arr)
        records.append(
            {
                "source": rel,
                "sha1": digest,
                "categories": list(parts.categories),
                "folder": "/".join(parts.categories),
            }
        )
        if (n + 1) % 1000 == 0:
            logger.info("  %d/%d files", n + 1, len(files))
    stats["skipped"] = skipped
    return np.stack(images), records, stats


def build_data(
    source: str | os.PathLike,
    out: str | os.PathLike = DEFAULT_DATA_DIR,
    size: int = 32,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
) -> Path:
    """Render, caption, deduplicate and split the package into `out` (npz + json). Cached: the
    renderings are kept in `cache_dir` (if given) keyed by the package listing and size, so a
    new split does not re-render; `out` is left alone if it was built the same way."""
    root = find_package_root(source)
    out = Path(out)
    files = sorted(p for p in root.rglob("*.png") if p.is_file())
    listing = hashlib.sha256("\n".join(str(p.relative_to(root)) for p in files).encode())
    key = {
        "size": size,
        "seed": seed,
        "parser": PARSER_VERSION,
        "listing_sha256": listing.hexdigest()[:16],
    }
    meta_path = out / META_NAME.format(size=size)
    if meta_path.is_file() and (out / IMAGES_NAME.format(size=size)).is_file():
        old = json.loads(meta_path.read_text())
        if old.get("build") == key and old.get("format_version") == DATA_FORMAT_VERSION:
            logger.info("%s: up to date", meta_path)
            return out
    cached = None
    if cache_dir is not None:
        cached = Path(cache_dir) / f"render-{size}-{key['listing_sha256']}"
    if cached is not None and (cached / "render.json").is_file():
        with np.load(cached / "images.npy.npz") as z:
            images = z["images"]
        records, stats = json.loads((cached / "render.json").read_text())
    else:
        images, records, stats = render_package(root, size)
        if cached is not None:
            cached.mkdir(parents=True, exist_ok=True)
            with atomic_path(cached / "images.npy.npz") as tmp, open(tmp, "wb") as f:
                np.savez(f, images=images)
            with atomic_path(cached / "render.json") as tmp:
                tmp.write_text(json.dumps([records, stats]))
    parts = [split_name(r["source"]) for r in records]
    for r, p, a in zip(records, parts, resolve_artists(parts), strict=True):
        r["artist"] = a
        r["title"] = p.title if a else p.full_title
        r["caption"] = caption(r["title"], p.categories)
    choose_holdout(records, seed=seed)
    extend_holdout(records, seed=seed)
    info = {
        "kind": "genattr.world.clipart",
        "format_version": DATA_FORMAT_VERSION,
        "source": "Debian package openclipart-png (1:0.18+dfsg), public domain",
        "licence": "public domain (Creative Commons Public Domain Dedication, see README.md)",
        "build": key,
        **stats,
        "counts": dict(Counter(r["split"] for r in records)),
    }
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / IMAGES_NAME.format(size=size)) as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, images=images)
        os.chmod(tmp, 0o644)
    with atomic_path(meta_path) as tmp:
        tmp.write_text(json.dumps({**info, "records": records}, separators=(",", ":")))
        os.chmod(tmp, 0o644)
    logger.info("%d images written to %s (%s)", len(records), out, info["counts"])
    return out


def save_png(image: np.ndarray, path: Path) -> str:
    """Write an (S, S, 3) uint8 image as a PNG unless the file exists (atomic); the path."""
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            Image.fromarray(image).save(tmp, format="PNG")
    return str(path)


def write_npz_lzma(path: Path, images: np.ndarray) -> None:
    """An npz (`numpy.load` reads it as any other) compressed with LZMA rather than deflate:
    a quarter smaller on these samples; a fixed date, so the same images give the same
    bytes."""
    buf = io.BytesIO()
    np.lib.format.write_array(buf, images, allow_pickle=False)
    info = zipfile.ZipInfo("images.npy", date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_LZMA
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(info, buf.getvalue())


def write_packed(
    out: Path, *, meta_name: str, img_name: str, images: list[np.ndarray], meta: dict, size: int
) -> Path:
    """Write a pack of samples: the images, LZMA inside an npz, and the json metadata; `out`
    is made if absent. Refuses images that are not (size, size, 3).

    Args:
        out: The folder to write into.
        meta_name: The metadata file's name in `out`.
        img_name: The images' file name (npz) in `out`.
        images: The samples, each (size, size, 3).
        meta: The metadata (written as json).
        size: The samples' side in pixels.
    """
    if not images or images[0].shape != (size, size, 3):
        raise GenattrError(f"expected {size}x{size} samples to pack")
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / img_name) as tmp:
        write_npz_lzma(tmp, np.stack(images))
    write_text_atomic(out / meta_name, json.dumps(meta, indent=1) + "\n")
    return out


def read_packed(
    meta_path: Path, img_path: Path, version: int, missing: str
) -> tuple[dict[str, Any], np.ndarray]:
    """A shipped pair of files (json metadata + npz `images`), checked; `missing` is the error
    when either is absent."""
    if not meta_path.is_file() or not img_path.is_file():
        raise GenattrError(missing)
    meta = json.loads(meta_path.read_text())
    if meta.get("format_version") != version:
        raise GenattrError(f"{meta_path}: format_version {meta.get('format_version')} unknown")
    with np.load(img_path) as z:
        return meta, z["images"]


def read_packed_models(
    meta_path: Path,
    img_path: Path,
    version: int,
    missing: str,
    samples: Callable[[dict[str, Any]], int],
) -> tuple[dict[str, Any], list[dict[str, Any]], np.ndarray]:
    """A pack of models' samples (`read_packed`): its metadata without `models`, the models,
    and the images, checked to be as many as `samples(model)` adds up to."""
    meta, images = read_packed(meta_path, img_path, version, missing)
    models = meta.pop("models")
    total = sum(samples(m) for m in models)
    if total != len(images):
        raise GenattrError(f"{img_path}: {len(images)} images but the models name {total}")
    return meta, models, images


def load_data(directory: str | os.PathLike = DEFAULT_DATA_DIR, size: int = 32) -> ClipartData:
    """The shipped (or rebuilt) world data."""
    d = Path(directory)
    meta, images = read_packed(
        d / META_NAME.format(size=size),
        d / IMAGES_NAME.format(size=size),
        DATA_FORMAT_VERSION,
        f"{d}: no world data at {size} px; run `genattr world build-data`",
    )
    records = meta.pop("records")
    if len(records) != len(images):
        raise GenattrError(f"{d}: {len(images)} images but {len(records)} records")
    return ClipartData(images, records, meta)
