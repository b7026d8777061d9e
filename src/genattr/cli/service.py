"""`genattr serve`."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import typer

from genattr.cli._app import (
    _friendly_errors,
    _log,
    _set_threads,
    app,
)
from genattr.errors import GenattrError


@app.command()
@_friendly_errors
def serve(
    *,
    index: Annotated[
        Path | None,
        typer.Option(help="Index directory (default: the miniature world's, built once)."),
    ] = None,
    calibrator: Annotated[
        Path | None, typer.Option(help="calibrator.json or the authors' calibrator .pth.")
    ] = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    max_upload_mb: Annotated[float, typer.Option(help="Largest upload accepted (MB).")] = 20.0,
    max_decode_mb: Annotated[
        float, typer.Option(help="Memory all uploads may hold while decoded at once (MB).")
    ] = 768.0,
    top_k: Annotated[int, typer.Option(help="Training images listed by default.")] = 20,
    max_top_k: Annotated[int, typer.Option(help="Largest top_k a request may ask.")] = 100,
    threads: Annotated[int | None, typer.Option(help="Torch threads for the model.")] = None,
    weights: Annotated[str | None, typer.Option(help="Backbone weights, if not found.")] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
) -> None:
    """Serve attribution on the web: a page at / and a JSON API (docs at /docs)."""
    from genattr.serve.app import Limits
    from genattr.serve.app import serve as run_serve
    from genattr.serve.world_index import demo_index, world_cache_dir

    _set_threads(threads)
    for option, value in (("--max-upload-mb", max_upload_mb), ("--max-decode-mb", max_decode_mb)):
        if not math.isfinite(value) or value <= 0:
            raise GenattrError(f"{option} must be a positive number, not {value}")
    limits = Limits(
        max_upload_bytes=int(max_upload_mb * 2**20),
        default_top_k=top_k,
        max_top_k=max_top_k,
        max_decoded_bytes=int(max_decode_mb * 2**20),
    )
    if index is None:
        found = demo_index()
        if found is not None:
            index, calibrator = found[0], calibrator or found[1]
            _log(f"no --index: serving the demo's index {index} (calibrator {calibrator})")
        else:
            _log(
                "no --index: serving the miniature world's gallery "
                f"(indexed once, in {world_cache_dir()}; run `genattr demo` first for a "
                "trained head and calibrated influence)"
            )
    run_serve(
        index, calibrator, host=host, port=port, limits=limits, weights=weights, device=device
    )
