"""`genattr world ...`: build and measure the built-in miniature world."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from genattr.atomic import check_output
from genattr.cli._app import (
    _batch_work,
    _friendly_errors,
    _set_threads,
    _Typer,
    app,
    console,
)
from genattr.errors import GenattrError

world_app = _Typer(
    help="The miniature clip-art world: its data and its base text-to-image model.",
    no_args_is_help=True,
)
app.add_typer(world_app, name="world")


@world_app.command("build-data")
@_friendly_errors
@_batch_work
def world_build_data(
    *,
    source: Annotated[
        Path, typer.Option(help="Extracted openclipart-png (`dpkg-deb -x openclipart-png_*.deb`).")
    ],
    out: Annotated[
        Path | None, typer.Option(help="Output folder (default: the shipped data folder).")
    ] = None,
    size: Annotated[int, typer.Option(help="Image size (px).")] = 32,
    seed: Annotated[int, typer.Option(help="Seed of the exemplar hold-out.")] = 0,
    cache: Annotated[
        Path | None, typer.Option(help="Folder to keep renderings in between builds.")
    ] = None,
) -> None:
    """Render, caption, deduplicate and split Debian's openclipart-png for the world."""
    if out is not None:
        check_output(out, "dir")
    from genattr.world.clipart import DEFAULT_DATA_DIR, build_data, load_data

    path = build_data(source, out or DEFAULT_DATA_DIR, size, seed, cache)
    data = load_data(path, size)
    console.print(f"{len(data.records)} images in {path}: {data.info['counts']}")


@world_app.command("build")
@_friendly_errors
@_batch_work
def world_build(
    *,
    source: Annotated[
        Path, typer.Option(help="Extracted openclipart-png (`dpkg-deb -x openclipart-png_*.deb`).")
    ],
    work: Annotated[Path, typer.Option(help="Work folder: caches, checkpoints, benchmark.")],
    out: Annotated[
        Path | None, typer.Option(help="Output folder (default: the shipped data folder).")
    ] = None,
    base_steps: Annotated[int, typer.Option(help="Base-model training steps.")] = 20000,
    base_minutes: Annotated[
        float | None, typer.Option(help="Stop base training after this many minutes (resumable).")
    ] = None,
    engine: Annotated[str, typer.Option(help="Benchmark engine: local or ray.")] = "local",
    threads: Annotated[int | None, typer.Option(help="torch threads (default: torch's).")] = None,
) -> None:
    """Rebuild the whole world (data, base model, benchmark); every stage resumes."""
    if out is not None:
        check_output(out, "dir")
    from genattr.world.build import build_world
    from genattr.world.clipart import DEFAULT_DATA_DIR

    _set_threads(threads)
    done = build_world(
        source,
        work,
        out or DEFAULT_DATA_DIR,
        base_steps,
        base_minutes,
        engine=engine,
    )
    console.print("world complete" if done else "stopped early: run the same command to go on")


@world_app.command("build-benchmark")
@_friendly_errors
@_batch_work
def world_build_benchmark(
    *,
    work: Annotated[Path, typer.Option(help="Work folder (the benchmark resumes there).")],
    out: Annotated[
        Path | None, typer.Option(help="World data folder (default: the shipped one).")
    ] = None,
    base: Annotated[
        Path | None, typer.Option(help="Base pipeline (default: the one shipped in --out).")
    ] = None,
    engine: Annotated[str, typer.Option(help="Benchmark engine: local or ray.")] = "local",
    threads: Annotated[int | None, typer.Option(help="torch threads (default: torch's).")] = None,
) -> None:
    """Customize and sample every held-out set on the base model, resumably, and pack it."""
    if out is not None:
        check_output(out, "dir")
    from genattr.world.build import build_world_benchmark
    from genattr.world.clipart import DEFAULT_DATA_DIR

    _set_threads(threads)
    path = build_world_benchmark(work, out or DEFAULT_DATA_DIR, base, engine=engine)
    console.print(f"benchmark packed into {path}")


@world_app.command("train-encoder")
@_friendly_errors
@_batch_work
def world_train_encoder(
    *,
    run: Annotated[Path, typer.Option(help="Run folder (resumed from its last checkpoint).")],
    out: Annotated[
        Path | None, typer.Option(help="Weights file to write when done (default: RUN/...).")
    ] = None,
    steps: Annotated[int, typer.Option(help="Total training steps.")] = 1500,
    batch_size: Annotated[int, typer.Option(help="Images per step (two views each).")] = 256,
    widths: Annotated[str, typer.Option(help="Channels per stage, comma-separated.")] = "32,64,128",
    grid: Annotated[int, typer.Option(help="Feature layout: grid x grid pooled cells.")] = 4,
    min_scale: Annotated[
        float, typer.Option(help="Smallest crop of a view, as a share of the image side.")
    ] = 0.6,
    brightness: Annotated[float, typer.Option(help="Brightness change of a view, +/-.")] = 0.1,
    max_steps: Annotated[
        int | None, typer.Option(help="Stop after this many steps of this call (resumable).")
    ] = None,
    data: Annotated[Path | None, typer.Option(help="World data folder.")] = None,
    threads: Annotated[int | None, typer.Option(help="torch threads (default: torch's).")] = None,
) -> None:
    """Train the world's own feature space (`world-cnn`) on its pre-training images (SimCLR)."""
    if out is not None:
        check_output(out, "file")
    from genattr.world.clipart import DEFAULT_DATA_DIR, load_data
    from genattr.world.encoder import EncoderConfig, train_encoder

    _set_threads(threads)
    try:
        stages = [int(w) for w in widths.split(",")]
    except ValueError:
        raise GenattrError(f"--widths {widths!r}: expected integers such as 32,64,128") from None
    if steps < 1 or batch_size < 2 or grid < 1 or not stages or min(stages) < 1:
        raise GenattrError("--steps, --grid and --widths must be positive, --batch-size >= 2")
    if not 0 < min_scale <= 1 or not 0 <= brightness < 1:
        raise GenattrError("--min-scale must be in (0, 1], --brightness in [0, 1)")
    cfg = EncoderConfig(
        widths=stages,
        grid=grid,
        steps=steps,
        batch_size=batch_size,
        min_scale=min_scale,
        brightness=brightness,
    )
    path = train_encoder(load_data(data or DEFAULT_DATA_DIR), run, cfg, out, max_steps)
    console.print(f"encoder weights in {path}" if path.is_file() else f"stopped early: {path}")


@world_app.command("train-base")
@_friendly_errors
@_batch_work
def world_train_base(
    *,
    out: Annotated[Path, typer.Option(help="Run folder (resumed from its last checkpoint).")],
    steps: Annotated[int, typer.Option(help="Total steps (counting resumed ones).")] = 20000,
    max_minutes: Annotated[
        float | None, typer.Option(help="Stop (with a checkpoint) after this many minutes.")
    ] = None,
    checkpoint_minutes: Annotated[float, typer.Option(help="Checkpoint interval.")] = 5.0,
    data: Annotated[Path | None, typer.Option(help="World data folder.")] = None,
    threads: Annotated[int | None, typer.Option(help="torch threads (default: torch's).")] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="KEY=VALUE (JSON value): a training option to change from the resumed step "
            "on, e.g. snr_gamma=5; kept in the run's history.",
        ),
    ] = None,
) -> None:
    """Train (or resume) the world's base text-to-image model on CPU; writes OUT/pipeline."""
    check_output(out, "dir")
    import json

    from genattr.world.training import train_base

    changes = {}
    for item in set_ or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise GenattrError(f"--set {item!r}: expected KEY=VALUE")
        try:
            changes[key] = json.loads(value)
        except json.JSONDecodeError:
            changes[key] = value
    _set_threads(threads)
    report = train_base(
        out,
        data,
        steps,
        checkpoint_seconds=checkpoint_minutes * 60,
        max_seconds=None if max_minutes is None else max_minutes * 60,
        changes=changes,
    )
    console.print(
        f"step {report.step} ({report.steps_per_second:.3f} steps/s this run); "
        f"last checkpoint {report.checkpoints[-1]}; pipeline in {out / 'pipeline'}"
    )


@world_app.command("quality")
@_friendly_errors
@_batch_work
def world_quality(
    *,
    pipeline: Annotated[Path, typer.Option(help="A world pipeline (e.g. RUN/pipeline).")],
    out: Annotated[Path | None, typer.Option(help="Write the figures here (JSON).")] = None,
    n: Annotated[int, typer.Option(help="Samples (captions of pre-training images).")] = 64,
    gallery: Annotated[int, typer.Option(help="Gallery of other pre-training images.")] = 1000,
    steps: Annotated[int, typer.Option(help="DDIM steps.")] = 20,
    guidance: Annotated[
        float | None, typer.Option(help="Classifier-free guidance (default: the world's).")
    ] = None,
    data: Annotated[Path | None, typer.Option(help="World data folder.")] = None,
) -> None:
    """Measure the base model's samples: category agreement of nearest neighbours vs chance."""
    if out is not None:
        check_output(out, "file")
    import json

    from genattr.customize.pipeline import load_base_pipeline
    from genattr.world.base import GUIDANCE
    from genattr.world.clipart import DEFAULT_DATA_DIR, load_data
    from genattr.world.quality import sample_quality

    pipe = load_base_pipeline(pipeline, "cpu", "float32")
    world = load_data(data or DEFAULT_DATA_DIR)
    q = sample_quality(
        pipe,
        world,
        n=n,
        gallery=gallery,
        steps=steps,
        guidance=GUIDANCE if guidance is None else guidance,
    )
    text = json.dumps({"pipeline": str(pipeline), **q.as_dict()}, indent=1)
    if out is not None:
        out.write_text(text)
    console.print(text)
