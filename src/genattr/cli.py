"""The `genattr` command: thin wrappers over library functions, no logic of its own."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from genattr.errors import GenattrError

app = typer.Typer(no_args_is_help=True, add_completion=False)


@app.callback()
def main() -> None:
    """genattr: which training images are responsible for a generated image, and how much."""


def _fail(e: GenattrError) -> None:
    typer.echo(f"error: {e}", err=True)
    raise typer.Exit(2)


@app.command()
def extract(
    features: Annotated[str, typer.Option(help="Backbone name (see genattr.features).")],
    images: Annotated[
        str,
        typer.Option(help="Folder, text file of paths, webdataset .tar shard(s) or AbC JSON."),
    ],
    out: Annotated[Path, typer.Option(help="Embedding store directory (created or resumed).")],
    weights: Annotated[str | None, typer.Option(help="Weights path or id.")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 32,
    workers: Annotated[
        int | None, typer.Option(help="Decode processes (default: spare cores, 0 = inline).")
    ] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    dtype: Annotated[str, typer.Option(help="Compute precision: fp32, fp16 or bf16.")] = "fp32",
    store_dtype: Annotated[str, typer.Option(help="Stored precision: fp32 or fp16.")] = "fp32",
    shard_size: Annotated[int, typer.Option(help="Vectors per shard (the resume unit).")] = 10_000,
    threads: Annotated[int | None, typer.Option(help="Torch threads for the model.")] = None,
    max_pixels: Annotated[
        int | None, typer.Option(help="Larger images are refused as decompression bombs.")
    ] = None,
    root: Annotated[
        Path | None, typer.Option(help="Folder that relative paths in list/JSON files are under.")
    ] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Embed a collection of images into an embedding store; re-run to resume."""
    from genattr.features.extract import extract as run_extract

    try:
        r = run_extract(
            features,
            images,
            out,
            weights=weights,
            batch_size=batch_size,
            workers=workers,
            device=device,
            dtype=dtype,
            store_dtype=store_dtype,
            shard_size=shard_size,
            threads=threads,
            max_pixels=max_pixels,
            root=root,
            progress=progress,
        )
    except GenattrError as e:
        _fail(e)
        return
    resumed = f", resumed after {r.resumed_from}" if r.resumed_from else ""
    typer.echo(
        f"{out}: {r.store.count} vectors ({r.extracted} new{resumed}), "
        f"{r.failed_total} failed (see {out / 'failed.parquet'}), "
        f"{r.images_per_second:.1f} images/s"
    )
