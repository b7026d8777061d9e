"""A standalone HTML page per attribution run: each generated image beside its top training
images, each thumbnail sized by its influence as in the authors' demo (side ~ sqrt(influence))."""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Callable, Collection, Sequence
from typing import Any

from jinja2 import Environment, PackageLoader, select_autoescape
from markupsafe import Markup
from PIL import Image

THUMB = 256  # pixels at the display reference share below
REFERENCE_SHARE = 0.007  # the authors' demo: an image with 0.7 % influence is drawn full size
SMALL = 64  # images up to this side are embedded as they are and enlarged in the page


def image_data_uri(path: str, side: int) -> tuple[str, int, int] | None:
    """The image as a data URI with its display size (longest side `side`). Small images (the
    miniature world's 32 px) stay PNG at their own pixels and are drawn enlarged, pixelated."""
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


def img_tag(path: str, side: int, alt: str) -> Markup:
    """An <img> of `path` drawn `side` px on its longest side, or a grey '?' box."""
    found = image_data_uri(path, side)
    if found is None:
        return Markup("<div class='missing' style='width:{0}px;height:{0}px'>?</div>").format(side)
    uri, w, h = found
    return Markup("<img src='{}' width='{}' height='{}' alt='{}'>").format(uri, w, h, alt)


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


TEMPLATES = Environment(
    loader=PackageLoader("genattr.report", "templates"),
    autoescape=select_autoescape(default=True, default_for_string=True),
    keep_trailing_newline=True,
)


def attribution_section(
    a: Any, true_paths: Collection[str] = (), caption: Callable[[Any], str] | None = None
) -> Markup:
    """One query beside its ranked training images; those in `true_paths` are outlined green.
    `caption(result)` gives a training image's label as plain text (escaped here)."""
    rows = [
        {
            "rank": r.rank,
            "influence": r.influence,
            "similarity": r.similarity,
            "label": caption(r) if caption else (r.path or r.id),
            "true": r.path in true_paths,
            "img": img_tag(r.path, thumbnail_side(r.influence), r.id),
        }
        for r in a.results
    ]
    html = TEMPLATES.get_template("attribution_section.html.j2").render(
        a=a, rows=rows, query_img=img_tag(a.query, 160, "query")
    )
    return Markup(html)


def render_attributions(answers: Sequence) -> str:
    """The standalone page of `genattr attribute --format html`."""
    return TEMPLATES.get_template("attributions.html.j2").render(
        style=Markup(STYLE), sections=[attribution_section(a) for a in answers]
    )
