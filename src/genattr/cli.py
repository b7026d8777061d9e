"""The `genattr` command. Each subcommand parses options and calls one library function."""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from genattr.errors import GenattrError

app = typer.Typer(
    help="Data attribution for text-to-image models: which training images made this image?",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
err_console = Console(stderr=True)


def _friendly_errors(fn):
    """GenattrError -> one line on stderr and exit code 2, no traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except GenattrError as e:
            err_console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


def _greedy_ints(ctx: typer.Context, first: list[int] | None, default: tuple[int, ...]):
    """Let `--ks 5 10 100` work as well as `--ks 5 --ks 10`: typer leaves the rest in ctx.args."""
    extra = []
    for arg in ctx.args:
        if not arg.lstrip("-").isdigit():
            raise GenattrError(f"unexpected argument {arg!r}")
        extra.append(int(arg))
    return (*first, *extra) if first else default


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@_friendly_errors
def evaluate(
    ctx: typer.Context,
    gallery_feats: Annotated[Path, typer.Option(help="Distractor features (.pth: feats, paths).")],
    test_feats: Annotated[Path, typer.Option(help="Test-case features (.pth, extract_feat.py).")],
    out: Annotated[Path, typer.Option(help="results.json; per-query table goes beside it.")],
    mapper: Annotated[Path | None, typer.Option(help="Mapper checkpoint (.pth).")] = None,
    head: Annotated[
        str | None, typer.Option(help="linear|channel|mlp; read from the checkpoint if omitted.")
    ] = None,
    ks: Annotated[
        list[int] | None, typer.Option(help="Recall cut-offs, e.g. --ks 5 10 100.")
    ] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
) -> None:
    """Evaluate attribution on an AbC benchmark with the authors' protocol."""
    from genattr.evaluate import DEFAULT_KS, evaluate_files, results_table

    if head is not None and head not in ("linear", "channel", "mlp"):
        raise GenattrError(f"--head must be linear, channel or mlp, not {head!r}")
    ks_all = _greedy_ints(ctx, ks, DEFAULT_KS)
    result = evaluate_files(
        gallery_feats, test_feats, out, mapper, head, ks_all, device, progress=sys.stderr.isatty()
    )
    console.print(results_table(result, title=f"AbC evaluation: {test_feats.name}"))
    console.print(f"results written to {out}")


@app.command()
@_friendly_errors
def demo(
    out: Annotated[Path, typer.Option(help="Folder for the demo's files.")] = Path("demo-output"),
    seed: Annotated[int, typer.Option(help="Seed of the built-in world.")] = 0,
) -> None:
    """Run the evaluation end to end on the built-in synthetic world."""
    from genattr.evaluate import results_table
    from genattr.world.demo import run_demo

    console.print(
        "[bold]genattr demo[/]: a synthetic feature-space AbC benchmark (20,000 distractors, "
        "30 object and 10 style models), evaluated with the authors' protocol."
    )
    for name, result in run_demo(out, seed=seed).items():
        console.print(results_table(result, title=f"AbC evaluation, {name}"))
    console.print(f"files written to {out}/")


@app.command()
@_friendly_errors
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
    resumed = f", resumed after {r.resumed_from}" if r.resumed_from else ""
    console.print(
        f"{out}: {r.store.count} vectors ({r.extracted} new{resumed}), "
        f"{r.failed_total} failed (see {out / 'failed.parquet'}), "
        f"{r.images_per_second:.1f} images/s",
        highlight=False,
        soft_wrap=True,
    )


if __name__ == "__main__":
    app()
