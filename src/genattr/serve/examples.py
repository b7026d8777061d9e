"""Example queries for the service's page: test samples of the world's benchmark whose true
exemplars are in the served gallery, so a new user tries attribution with one click and sees
the right answer beside the service's (as the authors' demo offers example queries).

A gallery image is a world image when its recorded path is `genattr-world:clipart<S>/<row>`
(the index `genattr serve` builds by default) or a file the demo unpacked,
`.../world/{pretrain,exemplars}/.../<row>.png` (the demo's index).
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from pathlib import PurePath

from PIL import Image

from genattr.errors import GenattrError
from genattr.serve.gallery import WORLD_PATH, Gallery
from genattr.world.benchmark import load_benchmark

EXAMPLE_CASES = ("object", "unobserved", "style")
_DEMO_PART = re.compile(r"(^|/)world/(pretrain|exemplars)/")


@dataclass(frozen=True)
class Example:
    label: str
    png: bytes
    exemplar_ids: list[str]  # gallery ids of the sample's true exemplars


def world_row(path: str) -> int | None:
    """The world-data row a recorded gallery path stands for, or None."""
    m = WORLD_PATH.match(path)
    if m is not None:
        return int(m["row"])
    p = PurePath(path)
    if _DEMO_PART.search(p.as_posix()) and p.stem.isdigit():
        return int(p.stem)
    return None


def world_examples(gallery: Gallery, n: int = 6) -> list[Example]:
    """Up to `n` test samples, taken in turn from each test case, whose every exemplar is in
    the gallery; none when the gallery holds no world images or the world is not installed."""
    ids_by_row: dict[int, str] = {}
    for id_, path in zip(gallery.ids, gallery.paths, strict=True):
        row = world_row(path)
        if row is not None:
            ids_by_row.setdefault(row, id_)
    if not ids_by_row:
        return []
    try:
        bench = load_benchmark()
    except GenattrError:
        return []
    usable = [
        m
        for m in bench.models
        if m["split"] == "test" and all(e in ids_by_row for e in m["exemplars"])
    ]
    by_case = [[m for m in usable if m.get("case", m["mode"]) == c] for c in EXAMPLE_CASES]
    out: list[Example] = []
    while len(out) < n and any(by_case):
        for models in by_case:
            if not models or len(out) >= n:
                continue
            m = models.pop(0)
            ptype, (start, _) = next(iter(m["synth"].items()))
            buf = io.BytesIO()
            Image.fromarray(bench.images[start]).save(buf, format="PNG")
            what = m.get("case", m["mode"]) + (f", {m['category']}" if m.get("category") else "")
            label = f"{m['id']} ({what}): {m['prompts'][ptype][0]}"
            out.append(Example(label, buf.getvalue(), [ids_by_row[e] for e in m["exemplars"]]))
    return out
