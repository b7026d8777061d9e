"""`genattr counterfactual`: rank attribution methods by retraining (LDS, leave-K-out)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from genattr.atomic import check_output
from genattr.cli._app import _batch_work, _friendly_errors, _set_threads, app, console
from genattr.errors import GenattrError, validation_reason


def _parse_shard(shard: str) -> tuple[int, int]:
    try:
        index, count = (int(x) for x in shard.split("/"))
    except ValueError:
        raise GenattrError(f"--shard must be I/N (e.g. 0/2), not {shard!r}") from None
    if not 0 <= index < count:
        raise GenattrError(f"--shard {shard}: need 0 <= I < N")
    return index, count


@app.command("counterfactual")
@_friendly_errors
@_batch_work
def counterfactual(
    *,
    out: Annotated[Path, typer.Option(help="Study folder (resumed if it exists).")],
    world_sets: Annotated[
        int | None, typer.Option(help="Study the world's captioned sets of this many images.")
    ] = None,
    models: Annotated[
        int | None, typer.Option(help="With --world-sets: the first N models.")
    ] = None,
    bench: Annotated[
        Path | None,
        typer.Option(help="Study the captioned models of a make-benchmark folder's manifest.json."),
    ] = None,
    subsets: Annotated[int, typer.Option(help="Random training subsets (M).")] = 32,
    alpha: Annotated[float, typer.Option(help="Fraction of the set each subset keeps.")] = 0.5,
    seeds: Annotated[int, typer.Option(help="Training seeds per subset (R).")] = 2,
    timesteps: Annotated[int, typer.Option(help="Timesteps each margin is measured at.")] = 32,
    noises: Annotated[int, typer.Option(help="Fixed noises per timestep.")] = 2,
    leave_k_out: Annotated[
        int, typer.Option(help="Leave-K-out on this many queries per model (0: none).")
    ] = 0,
    methods: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated methods (pixel, world-cnn, world-cnn-text, text-alone, "
            "gradient-loss, gradient-square-norm, trak-loss, unlearning); default all."
        ),
    ] = None,
    shard: Annotated[
        str, typer.Option(help="I/N: this process's share of the retraining (run N of them).")
    ] = "0/1",
    device: Annotated[str, typer.Option(help="Retrain on cpu, cuda, cuda:N or auto.")] = "cpu",
    engine: Annotated[
        str, typer.Option(help="local (in this process) or ray (the retraining over Ray tasks).")
    ] = "local",
    workers: Annotated[
        int | None, typer.Option(help="With --engine ray: tasks (default: one per GPU or CPU).")
    ] = None,
    write_teacher: Annotated[
        list[str] | None,
        typer.Option(
            help="Also write a teacher file (OUT/teachers/NAME.npz) from this scored method "
            "(e.g. gradient-square-norm) or 'margins', for train-head --objective distill; "
            "repeatable."
        ),
    ] = None,
    threads: Annotated[int | None, typer.Option(help="torch threads.")] = None,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Retrain each customized model on random subsets of its training set, measure its
    queries' losses, and score every method by LDS (and leave-K-out): results.json in OUT;
    with --write-teacher, teacher files to distil a head from."""
    from pydantic import ValidationError

    from genattr.devices import resolve_device
    from genattr.workflows.counterfactual import (
        ENGINES,
        Engine,
        StudySpec,
        bench_set_cases,
        world_set_cases,
    )
    from genattr.workflows.counterfactual_scores import default_methods, run_study

    if (world_sets is None) == (bench is None):
        raise GenattrError("give one of --world-sets N or --bench MANIFEST")
    part = _parse_shard(shard)
    if engine not in ENGINES:
        raise GenattrError(f"--engine must be one of {', '.join(ENGINES)}, not {engine!r}")
    if workers is not None and workers < 1:
        raise GenattrError(f"--workers must be at least 1, not {workers}")
    run_on = Engine(resolve_device(device), engine, workers)
    out = check_output(out, "dir")
    _set_threads(threads)
    try:
        spec = StudySpec(
            subsets=subsets, alpha=alpha, seeds=seeds, timesteps=timesteps,
            noises_per_timestep=noises,
        )  # fmt: skip
    except ValidationError as e:
        raise GenattrError(f"study options: {validation_reason(e)}") from None
    if world_sets is not None:
        from genattr.world.base import base_model_dir

        base, cases = str(base_model_dir()), world_set_cases(out, size=world_sets, models=models)
    else:
        assert bench is not None
        base, cases = bench_set_cases(bench)
    chosen = default_methods(None if methods is None else methods.split(","))
    results = run_study(
        cases, base=base, work=out, spec=spec, methods=chosen, leave_k_out_queries=leave_k_out,
        shard=part, engine=run_on, progress=progress,
    )  # fmt: skip
    if results is None:
        console.print(f"shard {shard} done; run the other shards, then any one again")
        return
    lds = results["lds"]
    ceiling = lds["ceiling"]
    if ceiling:
        console.print(f"seed ceiling {ceiling['mean']:.3f} +- {ceiling['se']:.3f}")
    for label, row in sorted(lds["methods"].items(), key=lambda kv: -kv[1]["lds"]["mean"]):
        s = row["lds"]
        console.print(f"{escape(label):32s} LDS {s['mean']:+.3f} +- {s['se']:.3f} (n={s['n']})")
    console.print(f"results: {out / 'results.json'}")
    if write_teacher:
        from genattr.workflows.teachers import write_study_teacher

        for label in write_teacher:
            console.print(f"teacher: {write_study_teacher(out, cases, label)}")
