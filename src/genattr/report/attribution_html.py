"""A standalone HTML page per attribution run: each generated image beside its top training
images, each thumbnail sized by its influence as in the authors' demo (side ~ sqrt(influence))."""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Sequence

THUMB = 256  # pixels at the display reference share below
REFERENCE_SHARE = 0.007  # the authors' demo: an image with 0.7 % influence is drawn full size


def _data_uri(path: str, side: int) -> str | None:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            im.thumbnail((side, side))
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=85)
    except (OSError, ValueError):
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def thumbnail_side(influence: float | None) -> int:
    if influence is None:
        return THUMB // 2
    return max(24, min(THUMB, int(1 + (THUMB - 1) * math.sqrt(influence / REFERENCE_SHARE))))


def render_attributions(answers: Sequence) -> str:
    parts = [
        "<!doctype html><meta charset='utf-8'><title>genattr attribution</title>",
        "<style>body{font-family:system-ui,sans-serif;margin:24px;color:#222}"
        ".q{display:flex;gap:24px;align-items:flex-start;margin-bottom:40px}"
        ".grid{display:flex;flex-wrap:wrap;gap:10px;align-items:center}"
        "figure{margin:0;text-align:center;font-size:12px}"
        "figcaption{max-width:260px;overflow-wrap:anywhere}"
        ".missing{background:#eee;display:flex;align-items:center;justify-content:center}</style>",
        "<h1>Which training images is each generated image leaning on?</h1>",
    ]
    for a in answers:
        query_img = _data_uri(a.query, 320)
        parts.append("<section class='q'><figure>")
        if query_img:
            parts.append(f"<img src='{query_img}' alt='query'>")
        parts.append(
            f"<figcaption><b>generated</b><br>{html.escape(a.query)}</figcaption></figure>"
        )
        parts.append("<div><div class='grid'>")
        for r in a.results:
            side = thumbnail_side(r.influence)
            uri = _data_uri(r.path, side)
            share = "" if r.influence is None else f"{100 * r.influence:.2f} % · "
            size = f"max-width:{side}px;max-height:{side}px"
            img = (
                f"<img src='{uri}' style='{size}' alt='{html.escape(r.id)}'>"
                if uri
                else f"<div class='missing' style='width:{side}px;height:{side}px'>?</div>"
            )
            parts.append(
                f"<figure>{img}<figcaption>#{r.rank} · {share}sim {r.similarity:.3f}<br>"
                f"{html.escape(r.path or r.id)}</figcaption></figure>"
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
    return "\n".join(parts) + "\n"
