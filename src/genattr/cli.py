"""The `genattr` command. Each subcommand parses options and calls one library function."""

from __future__ import annotations

import errno
import functools
import logging
import math
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from typer.core import TyperCommand

from genattr.atomic import DISK_ERRNOS, check_output
from genattr.errors import GenattrError, check_count, missing_extra


class _ListOptionsCommand(TyperCommand):
    """Options that take several values take them one way everywhere: `--ks 5 10 100` and
    `--ks 5 --ks 10 --ks 100` alike. Values after such an option, up to the next option, are
    rewritten to repeated options before click parses them. Commands with positional
    arguments keep the repeated form only, so no positional argument is swallowed."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        # typer ships its own copy of click: tell parameters apart by their type name
        if any(p.param_type_name == "argument" for p in self.params):
            return super().parse_args(ctx, args)
        lists = {
            name
            for p in self.params
            if p.param_type_name == "option" and getattr(p, "multiple", False)
            for name in p.opts
        }
        out: list[str] = []
        i = 0
        while i < len(args):
            token = args[i]
            out.append(token)
            i += 1
            if token not in lists:
                continue
            if i < len(args):  # the option's first value, whatever it looks like
                out.append(args[i])
                i += 1
            while i < len(args) and not args[i].startswith("-"):
                out += [token, args[i]]
                i += 1
        return super().parse_args(ctx, out)


class _Typer(typer.Typer):
    """typer.Typer whose commands accept several values after a list option."""

    def command(self, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("cls", _ListOptionsCommand)
        return super().command(*args, **kwargs)


app = _Typer(
    help="Data attribution for text-to-image models: which training images made this image?",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
err_console = Console(stderr=True)


class _ConsoleLog(logging.Handler):
    """The library's `logging` messages (INFO and up) on stderr, as plain lines."""

    def emit(self, record: logging.LogRecord) -> None:
        err_console.print(self.format(record), highlight=False, soft_wrap=True, markup=False)


def _console_logging() -> None:
    root = logging.getLogger("genattr")
    if not any(isinstance(h, _ConsoleLog) for h in root.handlers):
        root.addHandler(_ConsoleLog())
        root.setLevel(logging.INFO)


# the environment's refusals, not genattr's bugs: said in one line like bad input
_ENVIRONMENT_ERRNOS = {*DISK_ERRNOS, errno.EROFS, errno.EACCES, errno.EPERM}
_debug = {"on": False}


@app.callback()
def _main(
    debug: Annotated[
        bool, typer.Option("--debug", help="Show the traceback of an unexpected error.")
    ] = False,
) -> None:
    """Data attribution for text-to-image models: which training images made this image?"""
    _debug["on"] = debug or os.environ.get("GENATTR_DEBUG", "") not in ("", "0")


def _friendly_errors(fn):
    """GenattrError (bad input) and a full disk or read-only folder -> one line on stderr and
    exit code 2. Anything else is a bug in genattr: one line saying so and exit code 1, the
    traceback with --debug. The library's log messages go to the console meanwhile."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        _console_logging()
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, KeyboardInterrupt):
            raise
        except GenattrError as e:
            err_console.print(
                f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True
            )
            raise typer.Exit(2) from None
        except Exception as e:
            if _debug["on"]:
                raise
            extra = missing_extra(e) if isinstance(e, ImportError) else None
            if extra is not None:
                err_console.print(
                    f"[bold red]error:[/] {escape(extra)}", highlight=False, soft_wrap=True
                )
                raise typer.Exit(2) from None
            if isinstance(e, OSError) and e.errno in _ENVIRONMENT_ERRNOS:
                where = f"{e.filename}: " if e.filename else ""
                err_console.print(
                    f"[bold red]error:[/] {escape(where + str(e.strerror))}",
                    highlight=False,
                    soft_wrap=True,
                )
                raise typer.Exit(2) from None
            first = str(e).splitlines()[0] if str(e) else ""
            err_console.print(
                f"[bold red]internal error[/] (a bug in genattr, please report it): "
                f"{type(e).__name__}: {escape(first)}\nrerun with --debug for the traceback",
                highlight=False,
                soft_wrap=True,
            )
            raise typer.Exit(1) from None

    return wrapper


def _batch_work(fn):
    """A batch command: the C allocator keeps freed memory for the next batch instead of
    mapping and faulting it in again (`genattr.alloc`). Not for `serve`, whose memory must
    go back after a burst."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from genattr.alloc import tune_for_batch_work

        tune_for_batch_work()
        return fn(*args, **kwargs)

    return wrapper


# the model-based methods' settings, the same options on `evaluate` and `attribute`
KernelOption = Annotated[str, typer.Option(help="gradient: cosine or trak.")]
ProjDimOption = Annotated[int, typer.Option(help="gradient: projected dimensions.")]
UnlearningStepsOption = Annotated[
    int | None, typer.Option(help="unlearning: ascent steps (default AbU-like, see docs).")
]
FlipOption = Annotated[bool, typer.Option(help="unlearning: AbU's max over a horizontal flip.")]


def _method_options(
    method: str,
    kernel: str,
    proj_dim: int,
    params: str,
    output: str,
    steps: int | None,
    flip: bool,
) -> dict[str, Any]:
    """The settings of a model-based method from the command's options (each method its own)."""
    if method == "unlearning":
        return {"params": params, "flip": flip, **({"steps": steps} if steps is not None else {})}
    return {"kernel": kernel, "proj_dim": proj_dim, "params": params, "output": output}


@app.command()
@_friendly_errors
@_batch_work
def evaluate(
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


def _set_threads(threads: int | None) -> None:
    """torch's intra-op threads for this command, when `--threads` is given."""
    import torch

    if threads is not None:
        check_count(threads, "--threads", minimum=1)
        torch.set_num_threads(threads)


def _log(msg: str) -> None:
    err_console.print(msg, highlight=False, soft_wrap=True)


@app.command()
@_friendly_errors
@_batch_work
def customize(
    base: Annotated[str, typer.Option(help="Stable Diffusion 1.x: HF id (cache) or folder.")],
    exemplars: Annotated[
        list[Path], typer.Option(help="Exemplar images or folders, e.g. --exemplars a.png b.png.")
    ],
    out: Annotated[Path, typer.Option(help="Folder for the customized model.")],
    mode: Annotated[
        str, typer.Option(help="object, style, or captioned (each image with its caption).")
    ] = "object",
    category: Annotated[
        str | None, typer.Option(help="Object category word (objects only).")
    ] = None,
    captions: Annotated[
        Path | None,
        typer.Option(
            help="Captioned sets: one caption per image (text file in name order, or a "
            "JSON/YAML list or {file name: caption} mapping)."
        ),
    ] = None,
    freeze_model: Annotated[
        str,
        typer.Option(help="crossattn_kv (Custom Diffusion: to_k/to_v) or crossattn (all four)."),
    ] = "crossattn_kv",
    reg_images: Annotated[
        list[Path] | None, typer.Option(help="Regularization images or folders.")
    ] = None,
    reg_captions: Annotated[
        str | None,
        typer.Option(help="Captions file (one per image, name order) or one prompt for all."),
    ] = None,
    steps: Annotated[int, typer.Option(help="Training steps.")] = 250,
    lr: Annotated[float, typer.Option(help="Learning rate before scaling.")] = 1e-5,
    scale_lr: Annotated[bool, typer.Option(help="Scale lr by batch size.")] = True,
    batch_size: Annotated[int, typer.Option(help="Exemplar images per step.")] = 2,
    resolution: Annotated[int, typer.Option(help="Training resolution (px).")] = 512,
    seed: Annotated[int, typer.Option(help="Training seed.")] = 42,
    initializer_token: Annotated[str, typer.Option(help="Token <new1> starts from.")] = "ktn",
    hflip: Annotated[bool, typer.Option(help="Random horizontal flips.")] = True,
    augment: Annotated[bool, typer.Option(help="Custom Diffusion's rescale augmentation.")] = True,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N.")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto (fp16 on GPU), float32, float16, bfloat16.")] = (
        "auto"
    ),
) -> None:
    """Custom Diffusion: tune <new1> and cross-attention keys/values toward exemplars, or
    cross-attention toward a set of captioned images (--mode captioned --captions FILE)."""
    check_output(out, "dir")
    from genattr.customize.config import config_from_dict
    from genattr.customize.examples import list_images
    from genattr.customize.prompts import read_image_captions
    from genattr.customize.train import customize as run_customize
    from genattr.customize.train import read_reg_captions

    cfg = config_from_dict(  # checked as a plan's `train:` is, before the model loads
        {
            "initializer_token": initializer_token,
            "learning_rate": lr,
            "scale_lr": scale_lr,
            "train_batch_size": batch_size,
            "max_train_steps": steps,
            "resolution": resolution,
            "hflip": hflip,
            "augment": augment,
            "seed": seed,
            "freeze_model": freeze_model,
        }
    )
    if (mode == "captioned") != (captions is not None):
        raise GenattrError("--captions goes with --mode captioned, and only with it")
    image_captions = (
        read_image_captions(captions, list_images(exemplars)) if captions is not None else None
    )
    reg = read_reg_captions(reg_captions) if reg_captions else None
    path, stats = run_customize(
        base, exemplars, mode, out, category, cfg, reg_images, reg, device, dtype, image_captions
    )
    console.print(
        f"trained {stats.steps} steps in {stats.seconds:.1f} s "
        f"({stats.steps_per_second:.2f} steps/s); model written to {path}"
    )


@app.command()
@_friendly_errors
@_batch_work
def generate(
    model: Annotated[Path, typer.Option(help="Customized model folder.")],
    prompts: Annotated[
        str, typer.Option(help="Prompt set: media, captions, style-scene, style-object, or a file.")
    ],
    out: Annotated[Path, typer.Option(help="Folder for 00000.png ... and generation.json.")],
    category: Annotated[str | None, typer.Option(help="Category (default: the model's).")] = None,
    captions: Annotated[
        Path | None, typer.Option(help="Captions file for the captions set.")
    ] = None,
    images_per_prompt: Annotated[int, typer.Option(help="Images per prompt.")] = 4,
    scheduler: Annotated[str, typer.Option(help="ddim, ddpm, pndm, dpm, euler, euler-a.")] = (
        "ddim"
    ),
    steps: Annotated[int, typer.Option(help="Sampling steps.")] = 100,
    guidance_scale: Annotated[float, typer.Option(help="Classifier-free guidance.")] = 6.0,
    eta: Annotated[float, typer.Option(help="DDIM eta.")] = 1.0,
    seed: Annotated[int, typer.Option(help="Seed of image 0; image k uses seed + k.")] = 0,
    size: Annotated[int | None, typer.Option(help="Image size (px); default the model's.")] = None,
    base: Annotated[
        str | None, typer.Option(help="Base model, if the model folder does not record it.")
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N.")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto (fp16 on GPU), float32, float16, bfloat16.")] = (
        "auto"
    ),
) -> None:
    """Sample a customized model on a prompt set (seeds and settings recorded per image)."""
    check_output(out, "dir")
    from genattr.customize.prompts import load_prompt_set, read_captions
    from genattr.customize.sample import generate as run_generate
    from genattr.customize.sample import read_model_info, sample_config_from_dict

    info = read_model_info(model)
    pset = load_prompt_set(prompts)
    texts = pset.render(
        category or info.get("category"), read_captions(captions) if captions else None
    )
    cfg = sample_config_from_dict(
        {
            "scheduler": scheduler,
            "steps": steps,
            "guidance_scale": guidance_scale,
            "eta": eta,
            "seed": seed,
            "images_per_prompt": images_per_prompt,
            "height": size,
            "width": size,
        }
    )
    _paths, stats = run_generate(model, texts, out, cfg, base=base, device=device, dtype=dtype)
    console.print(
        f"{stats.images} images in {stats.seconds:.1f} s ({stats.images_per_second:.2f} "
        f"images/s) written to {out}"
    )


@app.command("make-benchmark")
@_friendly_errors
@_batch_work
def make_benchmark(
    plan: Annotated[Path, typer.Option(help="Plan (.yaml or .json): models and prompt sets.")],
    out: Annotated[Path, typer.Option(help="Benchmark folder (resumed if it exists).")],
    engine: Annotated[str, typer.Option(help="local (in-process) or ray (one task/model).")] = (
        "local"
    ),
    device: Annotated[str | None, typer.Option(help="Overrides the plan's device.")] = None,
    dtype: Annotated[str | None, typer.Option(help="Overrides the plan's dtype.")] = None,
    ray_address: Annotated[str | None, typer.Option(help="Ray cluster address.")] = None,
    gpus_per_model: Annotated[
        float | None, typer.Option(help="GPUs per Ray task (default 1, 0 on cpu).")
    ] = None,
) -> None:
    """Customize and sample every model of a plan; write AbC JSON and a manifest."""
    check_output(out, "dir")
    from genattr.customize.driver import make_benchmark as run_make

    manifest, _results = run_make(
        plan,
        out,
        engine=engine,
        device=device,
        dtype=dtype,
        ray_address=ray_address,
        gpus_per_model=gpus_per_model,
    )
    counts = {s: len(manifest.split(s).models) for s in ("train", "val", "test")}
    console.print(
        f"benchmark {manifest.name!r}: {len(manifest.models)} models "
        f"({', '.join(f'{k} {v}' for k, v in counts.items())}) in {out}"
    )


@app.command()
@_friendly_errors
@_batch_work
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
    bench: Annotated[Path, typer.Option(help="Benchmark manifest (train/val splits by model).")],
    store_real: Annotated[Path, typer.Option(help="Store with the exemplar (real) images.")],
    store_synth: Annotated[Path, typer.Option(help="Store with the synthesized images.")],
    out: Annotated[Path, typer.Option(help="Head directory: head.safetensors + head.json.")],
    head: Annotated[str, typer.Option(help="linear, mlp or channel.")] = "linear",
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
) -> None:
    """Train the real and synth attribution heads with NT-Xent (the authors released none)."""
    from genattr.heads.train import TrainConfig
    from genattr.options import options_from_mapping
    from genattr.workflows.train_head import train_heads_from_stores

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


@app.command()
@_friendly_errors
def serve(
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


head_app = _Typer(
    help="Move heads between genattr and the authors' .pth format.", no_args_is_help=True
)
app.add_typer(head_app, name="head")


@head_app.command("import")
@_friendly_errors
def head_import(
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
    head: Annotated[Path, typer.Option(help="Head directory from train-head.")],
    out: Annotated[Path, typer.Option(help="The authors' mapper .pth to write.")],
) -> None:
    """Export a genattr head in the authors' mapper format (their eval.py loads it)."""
    check_output(out, "file")
    from genattr.workflows.train_head import export_mapper_pth

    pair = export_mapper_pth(head, out)
    console.print(f"{pair.kind} mapper written to {out}")


world_app = _Typer(
    help="The miniature clip-art world: its data and its base text-to-image model.",
    no_args_is_help=True,
)
app.add_typer(world_app, name="world")


@world_app.command("build-data")
@_friendly_errors
@_batch_work
def world_build_data(
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

    from genattr.world.base import train_base

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
    q = sample_quality(pipe, world, n, gallery, steps, GUIDANCE if guidance is None else guidance)
    text = json.dumps({"pipeline": str(pipeline), **q.as_dict()}, indent=1)
    if out is not None:
        out.write_text(text)
    console.print(text)


if __name__ == "__main__":
    app()
