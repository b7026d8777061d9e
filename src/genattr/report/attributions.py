"""Attributions as people read them: a terminal table, a JSON file, an HTML page."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

from rich.table import Table

from genattr.atomic import write_text_atomic
from genattr.attribution import Attribution
from genattr.errors import GenattrError
from genattr.report.attribution_html import render_attributions


def attributions_table(answers: Sequence[Attribution]):
    tables = []
    for a in answers:
        t = Table(title=f"{a.query}: the training images it leans on")
        for col in ("rank", "id", "path", "similarity", "influence"):
            t.add_column(
                col, justify="right" if col in ("rank", "similarity", "influence") else "left"
            )
        for r in a.results:
            infl = "–" if r.influence is None else f"{100 * r.influence:.2f} %"
            t.add_row(str(r.rank), r.id, r.path, f"{r.similarity:.4f}", infl)
        if a.remaining_influence is not None:
            t.caption = (
                f"influence outside the top {len(a.results)}: {100 * a.remaining_influence:.2f} %"
            )
        tables.append(t)
    return tables


def write_attributions(answers: Sequence[Attribution], fmt: str, out: str | os.PathLike) -> None:
    """json: one object per query; html: the query beside thumbnails sized by influence."""
    if fmt == "json":
        write_text_atomic(out, json.dumps([a.to_json() for a in answers], indent=2) + "\n")
    elif fmt == "html":
        write_text_atomic(out, render_attributions(answers))
    else:
        raise GenattrError(f"unknown format {fmt!r}; choose json or html")
