"""A standalone HTML page per attribution run: each generated image beside its top training
images, each thumbnail sized by its influence as in the authors' demo (side ~ sqrt(influence))."""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Callable, Collection, Sequence
from typing import Any

THUMB = 256  # pixels at the display reference share below
REFERENCE_SHARE = 0.007  # the authors' demo: an image with 0.7 % influence is drawn full size
SMALL = 64  # images up to this side are embedded as they are and enlarged in the page


def image_data_uri(path: str, side: int) -> tuple[str, int, int] | None:
    """The image as a data URI with its display size (longest side `side`). Small images (the
    miniature world's 32 px) stay PNG at their own pixels and are drawn enlarged, pixelated."""
    from PIL import Image

    try:
        with Image.open(path) as src:
            im = src.convert("RGB")
            w, h = im.size
            buf = io.BytesIO()
            if max(w, h) <= SMALL:
                im.save(buf, format="PNG")
                mime = "png"
            else:
                im.thumbnail((side, side))
                im.save(buf, format="JPEG", quality=85)
                mime = "jpeg"
    except (OSError, ValueError):
        return None
    scale = side / max(w, h)
    uri = f"data:image/{mime};base64," + base64.b64encode(buf.getvalue()).decode()
    return uri, max(1, round(w * scale)), max(1, round(h * scale))


def thumbnail_side(influence: float | None) -> int:
    if influence is None:
        return THUMB // 2
    return max(24, min(THUMB, int(1 + (THUMB - 1) * math.sqrt(influence / REFERENCE_SHARE))))


def img_tag(path: str, side: int, alt: str) -> str:
    """An <img> of `path` drawn `side` px on its longest side, or a grey '?' box."""
    found = image_data_uri(path, side)
    if found is None:
        return f"<div class='missing' style='width:{side}px;height:{side}px'>?</div>"
    uri, w, h = found
    return f"<img src='{uri}' width='{w}' height='{h}' alt='{html.escape(alt)}'>"


STYLE = (
    "<style>body{font-family:system-ui,sans-serif;margin:24px;color:#222}"
    ".q{display:flex;gap:24px;align-items:flex-start;margin-bottom:40px}"
    ".grid{display:flex;flex-wrap:wrap;gap:10px;align-items:center}"
    "figure{margin:0;text-align:center;font-size:12px}"
    "figcaption{max-width:260px;overflow-wrap:anywhere}"
    "img{image-rendering:pixelated}"
    ".true img{outline:3px solid #2a2;outline-offset:2px}"
    ".missing{background:#eee;display:flex;align-items:center;justify-content:center}</style>"
)


def attribution_section(
    a: Any, true_paths: Collection[str] = (), caption: Callable[[Any], str] | None = None
) -> str:
    """One query beside its ranked training images; those in `true_paths` are outlined green."""
    parts = ["<section class='q'><figure>", img_tag(a.query, 160, "query")]
    parts.append(f"<figcaption><b>generated</b><br>{html.escape(a.query)}</figcaption></figure>")
    parts.append("<div><div class='grid'>")
    for r in a.results:
        side = thumbnail_side(r.influence)
        share = "" if r.influence is None else f"{100 * r.influence:.2f} % · "
        label = caption(r) if caption else html.escape(r.path or r.id)
        cls = " class='true'" if r.path in true_paths else ""
        parts.append(
            f"<figure{cls}>{img_tag(r.path, side, r.id)}<figcaption>#{r.rank} · {share}"
            f"sim {r.similarity:.3f}<br>{label}</figcaption></figure>"
        )
    parts.append("</div>")
    if a.remaining_influence is not None:
        parts.append(
            f"<p>Influence outside these {len(a.results)} images: "
            f"<b>{100 * a.remaining_influence:.2f} %</b></p>"
        )
    for note in a.notes:
        parts.append(f"<p><i>{html.escape(note)}</i></p>")
    parts.append("</div></section>")
    return "\n".join(parts)


def render_attributions(answers: Sequence) -> str:
    parts = [
        "<!doctype html><meta charset='utf-8'><title>genattr attribution</title>",
        STYLE,
        "<h1>Which training images is each generated image leaning on?</h1>",
        *(attribution_section(a) for a in answers),
    ]
    return "\n".join(parts) + "\n"
