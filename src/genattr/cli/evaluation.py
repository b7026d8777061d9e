"""Commands that embed, train, calibrate, index, evaluate and attribute (and the demo)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from genattr.atomic import check_output
from genattr.cli._app import (
    FlipOption,
    KernelOption,
    ProjDimOption,
    UnlearningStepsOption,
    _batch_work,
    _friendly_errors,
    _method_options,
    _Typer,
    app,
    console,
)
from genattr.errors import GenattrError


@app.command()
@_friendly_errors
@_batch_work
def evaluate(
    *,
    out: Annotated[Path, typer.Option(help="results.json; per-query table goes beside it.")],
    gallery_feats: Annotated[
        Path | None,
        typer.Option(help="Distractor features: .pth (feats, paths) or a store directory."),
    ] = None,
    test_feats: Annotated[
        Path | None,
        typer.Option(help="Test-case features: .pth (extract_feat.py) or a store directory."),
    ] = None,
    mapper: Annotated[Path | None, typer.Option(help="Mapper checkpoint (.pth).")] = None,
    head: Annotated[
        str | None, typer.Option(help="linear|channel|mlp; read from the checkpoint if omitted.")
    ] = None,
    ks: Annotated[
        list[int] | None, typer.Option(help="Recall cut-offs, e.g. --ks 5 10 100.")
    ] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    method: Annotated[
        str,
        typer.Option(
            help="features (feature files above), or a method that loads the model behind "
            "each query: gradient (TRAK / D-TRAK) or unlearning (AbU); needs --bench."
        ),
    ] = "features",
    bench: Annotated[
        str | None,
        typer.Option(
            help="Model-based methods: 'world', 'world-multiconcept' or a make-benchmark "
            "manifest.json."
        ),
    ] = None,
    gallery: Annotated[
        Path | None, typer.Option(help="Gallery image folder (with --bench MANIFEST).")
    ] = None,
    captions: Annotated[
        str | None,
        typer.Option(help="Gallery captions: a text file, one per image in name order."),
    ] = None,
    models: Annotated[
        list[str] | None, typer.Option(help="Only these models, e.g. --models a b.")
    ] = None,
    queries: Annotated[
        int | None, typer.Option(help="At most this many queries per model.")
    ] = None,
    work: Annotated[
        Path | None,
        typer.Option(help="Folder for rebuilt models and cached gradients (default OUT's/work)."),
    ] = None,
    kernel: KernelOption = "cosine",
    proj_dim: ProjDimOption = 2048,
    params: Annotated[
        str, typer.Option(help="gradient: cross_attn_kv (Custom Diffusion's) or all.")
    ] = "cross_attn_kv",
    output: Annotated[str, typer.Option(help="gradient: loss, or square_norm (D-TRAK).")] = "loss",
    steps: UnlearningStepsOption = None,
    flip: FlipOption = False,
) -> None:
    """Evaluate attribution on an AbC benchmark with the authors' protocol."""
    from genattr.evaluate import DEFAULT_KS, results_table

    ks_all = tuple(ks) if ks else DEFAULT_KS
    if method != "features":
        from genattr.workflows.method_runs import evaluate_benchmark, results_lines

        if bench is None:
            raise GenattrError(f"--method {method} needs --bench world or --bench MANIFEST")
        options = _method_options(method, kernel, proj_dim, params, output, steps, flip)
        evaluation = evaluate_benchmark(
            method, bench, out, gallery=gallery, captions=captions, work=work, models=models,
            queries=queries, device=device, ks=ks_all, progress=sys.stderr.isatty(),
            options=options,
        )  # fmt: skip
        for line in results_lines(evaluation):
            console.print(line, highlight=False, soft_wrap=True)
        console.print(f"results written to {out}")
        return
    from genattr.workflows.evaluate import evaluate_files

    if gallery_feats is None or test_feats is None:
        raise GenattrError("--method features needs --gallery-feats and --test-feats")
    if head is not None and head not in ("linear", "channel", "mlp"):
        raise GenattrError(f"--head must be linear, channel or mlp, not {head!r}")
    result = evaluate_files(
        gallery_feats,
        test_feats,
        out,
        mapper=mapper,
        head=head,
        ks=ks_all,
        device=device,
        progress=sys.stderr.isatty(),
    )
    console.print(results_table(result, title=f"AbC evaluation: {test_feats.name}"))
    console.print(f"results written to {out}")


@app.command()
@_friendly_errors
@_batch_work
def demo(
    *,
    out: Annotated[Path, typer.Option(help="Folder for the demo's files.")] = Path("demo-out"),
    features: Annotated[
        list[str] | None,
        typer.Option(help="Backbones to compare, e.g. --features pixel world-cnn (default: both)."),
    ] = None,
    epochs: Annotated[int, typer.Option(help="Most epochs of head training.")] = 30,
    head: Annotated[str, typer.Option(help="Head to train: linear, channel or mlp.")] = "linear",
) -> None:
    """Attribution end to end on the built-in miniature world; writes OUT/report.html."""
    check_output(out, "dir")
    from genattr.workflows.demo import DEMO_BACKBONES, run_demo

    console.print(
        "[bold]genattr demo[/]: the miniature clip-art world: extract features, train heads, "
        "calibrate, evaluate on held-out customized models, attribute, report."
    )
    result = run_demo(out, features or DEMO_BACKBONES, head=head, epochs=epochs)
    table = Table(title="Test models: mean mAP over prompt types")
    for col in ("feature space", "raw", "with head"):
        table.add_column(col, justify="left" if col == "feature space" else "right")
    for name, o in result.outcomes.items():
        table.add_row(name, f"{o.mean_map('raw'):.3f}", f"{o.mean_map('head'):.3f}")
    console.print(table)
    console.print(f"report: [bold]{result.report}[/] ({result.seconds['total']:.0f} s)")


@app.command()
@_friendly_errors
@_batch_work
def extract(
    *,
    features: Annotated[str, typer.Option(help="Backbone name (see genattr.features).")],
    images: Annotated[
        str,
        typer.Option(help="Folder, text file of paths, webdataset .tar shard(s) or AbC JSON."),
    ],
    out: Annotated[Path, typer.Option(help="Embedding store directory (created or resumed).")],
    weights: Annotated[str | None, typer.Option(help="Weights path or id.")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 32,
    workers: Annotated[
        int | None,
        typer.Option(help="Decode processes (default: chosen from the first batch; 0 = inline)."),
    ] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    dtype: Annotated[str, typer.Option(help="Compute precision: fp32, fp16 or bf16.")] = "fp32",
    store_dtype: Annotated[str, typer.Option(help="Stored precision: fp32 or fp16.")] = "fp32",
    shard_size: Annotated[int, typer.Option(help="Vectors per shard (the resume unit).")] = 10_000,
    threads: Annotated[int | None, typer.Option(help="Torch threads for the model.")] = None,
    max_pixels: Annotated[
        int | None, typer.Option(help="Larger images are refused as decompression bombs.")
    ] = None,
    max_file_mb: Annotated[
        float | None, typer.Option(help="Larger files are failures, not read (default 256).")
    ] = None,
    root: Annotated[
        Path | None, typer.Option(help="Folder that relative paths in list/JSON files are under.")
    ] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    augment: Annotated[
        str | None, typer.Option(help="mild or strong: also embed augmented views.")
    ] = None,
    views: Annotated[int, typer.Option(help="Views per image with --augment (view 0 as is).")] = 1,
    engine: Annotated[
        str, typer.Option(help="local, or ray: Ray Data batch inference (same store).")
    ] = "local",
    concurrency: Annotated[
        int | None,
        typer.Option(help="Ray: model actors (default one per GPU, or per CPU but one)."),
    ] = None,
    ray_address: Annotated[
        str | None, typer.Option(help="Ray cluster address (default: start a local Ray).")
    ] = None,
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
        max_file_mb=max_file_mb,
        root=root,
        progress=progress,
        augment=augment,
        views=views,
        engine=engine,
        concurrency=concurrency,
        ray_address=ray_address,
    )
    resumed = f", resumed after {r.resumed_from}" if r.resumed_from else ""
    why = ", ".join(f"{n} {reason}" for reason, n in r.skipped.items())
    skipped = f"{r.skipped_total} skipped ({why}; see {out / 'skipped.parquet'}), " if why else ""
    done_now = r.extracted + r.failed_now
    rate = f"{r.images_per_second:.1f} images/s" if done_now else "nothing new to extract"
    console.print(
        f"{out}: {r.store.count} vectors ({r.extracted} new{resumed}), "
        f"{r.failed_total} failed (see {out / 'failed.parquet'}), {skipped}{rate}",
        highlight=False,
        soft_wrap=True,
    )


@app.command("train-head")
@_friendly_errors
@_batch_work
def train_head(
    *,
    bench: Annotated[
        Path | None,
        typer.Option(help="Benchmark manifest (train/val splits by model); for nt-xent."),
    ] = None,
    store_real: Annotated[Path, typer.Option(help="Store with the exemplar (real) images.")],
    store_synth: Annotated[Path, typer.Option(help="Store with the synthesized images.")],
    out: Annotated[Path, typer.Option(help="Head directory: head.safetensors + head.json.")],
    head: Annotated[
        str, typer.Option(help="linear, mlp, channel, or fastgda (FastGDA's MLP; distill only).")
    ] = "linear",
    distractors: Annotated[
        Path | None, typer.Option(help="Store of distractor training images (negatives).")
    ] = None,
    temperature: Annotated[float, typer.Option(help="NT-Xent temperature.")] = 0.07,
    lr: Annotated[float, typer.Option(help="AdamW learning rate.")] = 1e-3,
    batch_size: Annotated[int, typer.Option(help="Synthesized images per step.")] = 128,
    epochs: Annotated[int, typer.Option(help="At most this many epochs.")] = 30,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay.")] = 1e-4,
    patience: Annotated[int, typer.Option(help="Early stop after N epochs without gain.")] = 5,
    seed: Annotated[int, typer.Option(help="Makes a run repeatable.")] = 0,
    exemplar_negatives: Annotated[
        str, typer.Option(help="batch: the batch's other exemplars; all: every one, each step.")
    ] = "batch",
    strict_validation: Annotated[
        bool, typer.Option(help="Validate on the stricter gallery (every exemplar a distractor).")
    ] = False,
    objective: Annotated[
        str,
        typer.Option(help="nt-xent (exemplars as positives) or distill (a teacher's ranking)."),
    ] = "nt-xent",
    teacher: Annotated[
        Path | None, typer.Option(help="With --objective distill: the teacher file (.npz).")
    ] = None,
    cutoff: Annotated[
        int, typer.Option(help="With --objective distill: the teacher's top list per query.")
    ] = 1000,
    shared: Annotated[
        bool, typer.Option(help="With --objective distill: one map for both sides (FastGDA).")
    ] = False,
) -> None:
    """Train the real and synth attribution heads with NT-Xent (the authors released none),
    or distil them from a slow method's ranking (FastGDA's objective)."""
    from genattr.heads.train import TrainConfig
    from genattr.options import options_from_mapping
    from genattr.workflows.train_head import distill_head_from_stores, train_heads_from_stores

    if objective not in ("nt-xent", "distill"):
        raise GenattrError(f"--objective must be nt-xent or distill, not {objective!r}")
    if objective == "distill":
        from genattr.heads.distill import DistillConfig

        if teacher is None:
            raise GenattrError("--objective distill needs --teacher FILE")
        dconfig = options_from_mapping(
            DistillConfig,
            {"head": head, "cutoff": cutoff, "lr": lr, "weight_decay": weight_decay,
             "batch_size": batch_size, "epochs": epochs, "seed": seed, "shared": shared},
            "train-head --objective distill",
        )  # fmt: skip
        distilled = distill_head_from_stores(teacher, store_real, store_synth, out, dconfig)
        console.print(
            f"distilled {head} heads for {epochs} epochs; final loss "
            f"{distilled.history[-1]['loss']:.4f}; head written to {out}/"
        )
        return
    if bench is None:
        raise GenattrError("--objective nt-xent needs --bench MANIFEST")

    config = options_from_mapping(
        TrainConfig,
        {
            "head": head, "temperature": temperature, "lr": lr, "weight_decay": weight_decay,
            "batch_size": batch_size, "epochs": epochs, "patience": patience, "seed": seed,
            "exemplar_negatives": exemplar_negatives, "strict_validation": strict_validation,
        },
        "train-head",
    )  # fmt: skip
    result = train_heads_from_stores(
        bench,
        store_real,
        store_synth,
        out,
        config,
        distractors=distractors,
        progress=sys.stderr.isatty(),
    )
    last = result.history[-1] if result.history else {}
    best = next((h for h in result.history if h["epoch"] == result.best_epoch), {})
    console.print(
        f"trained {head} heads for {len(result.history)} epochs; final loss "
        f"{last.get('loss', float('nan')):.4f}"
        + (
            f"; best val mAP {100 * best['val_mAP']:.2f} at epoch {result.best_epoch}"
            if "val_mAP" in best
            else ""
        )
    )
    console.print(f"head written to {out}/")


@app.command()
@_friendly_errors
@_batch_work
def calibrate(
    *,
    bench: Annotated[Path, typer.Option(help="Benchmark manifest; its val models are used.")],
    store_real: Annotated[Path, typer.Option(help="Store with the exemplar (real) images.")],
    store_synth: Annotated[Path, typer.Option(help="Store with the synthesized images.")],
    distractors: Annotated[Path, typer.Option(help="Store of distractor training images.")],
    out: Annotated[Path, typer.Option(help="calibrator.json to write.")],
    head: Annotated[Path | None, typer.Option(help="Head directory from train-head.")] = None,
    top_l: Annotated[int, typer.Option(help="Candidates per query.")] = 100,
    heldout_fraction: Annotated[float, typer.Option(help="Share of models held out.")] = 0.3,
) -> None:
    """Fit the authors' calibrator (inv_tau, bias) and report it on held-out models."""
    from genattr.workflows.calibrate import calibrate_from_stores

    cal = calibrate_from_stores(
        bench,
        store_real,
        store_synth,
        distractors,
        out,
        head=head,
        top_l=top_l,
        heldout_fraction=heldout_fraction,
    )
    console.print(f"inv_tau {cal.inv_tau:.3f}, bias {cal.bias:.3f} (b = {cal.b:.5f})")
    held = cal.fit_report.get("heldout")
    if held:
        console.print(
            f"held-out: NLL {held['nll']:.4f} (plain softmax {held['softmax_t1_nll']:.4f}), "
            f"mass on true exemplars {100 * held['true_mass']:.1f} %"
        )
    console.print(f"calibrator written to {out}")


index_app = _Typer(help="Build attribution indexes.", no_args_is_help=True)
app.add_typer(index_app, name="index")


@index_app.command("build")
@_friendly_errors
@_batch_work
def index_build(
    *,
    store: Annotated[
        list[Path],
        typer.Option(help="Embedding store(s) of the training images: --store a b."),
    ],
    out: Annotated[Path, typer.Option(help="Index directory.")],
    head: Annotated[Path | None, typer.Option(help="Head directory from train-head.")] = None,
    kind: Annotated[
        str, typer.Option(help="auto, flat, ivf, ivfpq, ivf-ondisk or ivfpq-ondisk.")
    ] = "auto",
    memory_budget: Annotated[str, typer.Option(help="RAM the index may use, e.g. 4GB.")] = "4GB",
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Index a store (FAISS chosen from size and memory budget; similarities re-ranked exactly)."""
    from genattr.workflows.index import build_index_from_store

    index = build_index_from_store(
        store if len(store) > 1 else store[0],
        out,
        head=head,
        kind=kind,
        memory_budget=memory_budget,
        progress=progress,
    )
    console.print(
        f"{index.spec.kind} index ({index.spec.factory}) over {index.count:,} images: {out}/"
    )


@app.command()
@_friendly_errors
@_batch_work
def attribute(
    *,
    images: Annotated[list[Path], typer.Argument(help="Generated images to attribute.")],
    index: Annotated[
        Path | None, typer.Option(help="Index directory from `genattr index build`.")
    ] = None,
    calibrator: Annotated[
        Path | None, typer.Option(help="calibrator.json or the authors' calibrator .pth.")
    ] = None,
    top_k: Annotated[int, typer.Option(help="Training images to list per query.")] = 20,
    format: Annotated[str, typer.Option(help="table, json or html.")] = "table",
    out: Annotated[Path | None, typer.Option(help="File for json/html output.")] = None,
    weights: Annotated[str | None, typer.Option(help="Backbone weights, if not found.")] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    method: Annotated[
        str,
        typer.Option(
            help="features (an --index), or gradient / unlearning: scores under the model "
            "that made the images (--model)."
        ),
    ] = "features",
    model: Annotated[
        str | None,
        typer.Option(help="gradient: a Custom Diffusion folder, or world:ID for a world model."),
    ] = None,
    base: Annotated[
        str | None, typer.Option(help="gradient: the model's base (HF id/dir).")
    ] = None,
    gallery: Annotated[
        Path | None, typer.Option(help="gradient: the training images to score (a folder).")
    ] = None,
    captions: Annotated[
        str | None, typer.Option(help="gradient: their captions, one per line in name order.")
    ] = None,
    prompt: Annotated[
        str | None,
        typer.Option(help="gradient: the images' prompt (default: the one genattr recorded)."),
    ] = None,
    work: Annotated[
        Path, typer.Option(help="gradient: folder for cached gallery gradients.")
    ] = Path("genattr-work"),
    kernel: KernelOption = "cosine",
    proj_dim: ProjDimOption = 2048,
    steps: UnlearningStepsOption = None,
    flip: FlipOption = False,
) -> None:
    """Which training images made these images, and how much (calibrated influence)."""
    from genattr.report.attributions import attributions_table, write_attributions

    if format not in ("table", "json", "html"):
        raise GenattrError(f"--format must be table, json or html, not {format!r}")
    if format != "table" and out is None:
        raise GenattrError(f"--format {format} needs --out PATH")
    if out is not None:
        check_output(out, "file")
    if method == "features":
        from genattr.attribution import attribute as run_attribute

        if index is None:
            raise GenattrError("--method features needs --index DIR")
        answers = run_attribute(images, index, calibrator, top_k, weights=weights, device=device)
    else:
        from genattr.workflows.method_runs import attribute_with_model

        if model is None:
            raise GenattrError(f"--method {method} needs --model DIR or --model world:ID")
        answers = attribute_with_model(
            method, images, model, base=base, gallery=gallery, captions=captions, prompt=prompt,
            work=work, top_k=top_k, device=device, progress=sys.stderr.isatty(),
            options=_method_options(method, kernel, proj_dim, "cross_attn_kv", "loss", steps, flip),
        )  # fmt: skip
    if format == "table":
        for table in attributions_table(answers):
            console.print(table)
    else:
        assert out is not None  # checked before attributing
        write_attributions(answers, format, out)
        console.print(f"{len(answers)} attribution(s) written to {out}")


head_app = _Typer(
    help="Move heads between genattr and the authors' .pth format.", no_args_is_help=True
)
app.add_typer(head_app, name="head")


@head_app.command("import")
@_friendly_errors
def head_import(
    *,
    mapper: Annotated[Path, typer.Option(help="The authors' mapper .pth.")],
    out: Annotated[Path, typer.Option(help="Head directory to write.")],
    head: Annotated[str | None, typer.Option(help="linear|channel|mlp; read if omitted.")] = None,
    backbone: Annotated[
        str | None, typer.Option(help="Backbone the mapper was trained on.")
    ] = None,
) -> None:
    """Import the authors' mapper checkpoint as a genattr head directory."""
    check_output(out, "dir")
    from genattr.workflows.train_head import import_mapper_pth

    pair = import_mapper_pth(mapper, out, head, **({"backbone": backbone} if backbone else {}))
    console.print(f"{pair.kind} head written to {out}/")


@head_app.command("export")
@_friendly_errors
def head_export(
    *,
    head: Annotated[Path, typer.Option(help="Head directory from train-head.")],
    out: Annotated[Path, typer.Option(help="The authors' mapper .pth to write.")],
) -> None:
    """Export a genattr head in the authors' mapper format (their eval.py loads it)."""
    check_output(out, "file")
    from genattr.workflows.train_head import export_mapper_pth

    pair = export_mapper_pth(head, out)
    console.print(f"{pair.kind} mapper written to {out}")
