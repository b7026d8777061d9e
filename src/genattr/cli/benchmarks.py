"""Commands that make AbC benchmarks: customize, generate, make-benchmark."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from genattr.atomic import check_output
from genattr.cli._app import (
    _batch_work,
    _friendly_errors,
    app,
    console,
)
from genattr.errors import GenattrError


@app.command()
@_friendly_errors
@_batch_work
def customize(
    *,
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
        base,
        exemplars,
        mode,
        out,
        category,
        config=cfg,
        reg_images=reg_images,
        reg_captions=reg,
        device=device,
        dtype=dtype,
        captions=image_captions,
    )
    console.print(
        f"trained {stats.steps} steps in {stats.seconds:.1f} s "
        f"({stats.steps_per_second:.2f} steps/s); model written to {path}"
    )


@app.command()
@_friendly_errors
@_batch_work
def generate(
    *,
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
    *,
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
