"""The miniature world's multi-concept test case: Custom Diffusion models each tuned on K
exemplar sets at once (one modifier token per set), so that a model-based attribution method
cannot find the exemplars from membership alone.

In AbC every customized model is tuned on one exemplar set: a method that looks at the model
(gradients, unlearning, loss) can name the exemplars because the model has fitted exactly
them, whatever the query. Here one model has fitted K sets; the samples of one concept must
retrieve that concept's exemplars among all K sets the model was tuned on.

The choice (deterministic from `SEED`): the world benchmark's test models of each mode
(`LAYOUT`: objects of observed kinds, artists' styles; never unobserved objects), shuffled by
`numpy.random.default_rng([SEED, mode number])`, cut into `LAYOUT[mode]` models of `K`
concepts, concept k of a model getting the token `<new{k+1}>`. Training: the world
benchmark's `WORLD_TRAIN` with `max_train_steps` x K, so each concept gets about as many
steps as a single-concept model (examples are drawn from the union of the K sets' exemplars,
as Custom Diffusion does, so a style with more exemplars gets more draws: each concept's
count is recorded). Sampling: `WORLD_SAMPLE` at `IMAGES_PER_PROMPT` images per prompt, each
concept's own prompts from the world benchmark (both prompt types) with `<new1>` replaced by
its token.

Built into a work folder, resumably (a model with a state record matching its key is
skipped):
```
WORK/exemplars/{test model}/{index:05d}.png
WORK/models/{id}/        diffusers' Custom Diffusion format, one <newK>.bin per concept
WORK/synth/{id}/{token name}/{prompt type}/00000.png
WORK/state/{id}.json     written last: the model is complete
```
and packed small into `world_multiconcept{size}.{npz,json}` (samples only, no weights; the
npz is LZMA-compressed, which `numpy.load` reads as usual).

    python -m genattr.world.multiconcept build WORK [--pack]
    python -m genattr.world.multiconcept verify WORK MODEL_ID
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
from PIL import Image

from genattr.atomic import write_text_atomic
from genattr.customize.config import Concept, config_from_dict
from genattr.customize.loading import load_custom_diffusion
from genattr.customize.prompts import with_token
from genattr.customize.sample import generate_images, sample_config_from_dict
from genattr.customize.train import Customizer
from genattr.errors import GenattrError
from genattr.world.base import load_world_base
from genattr.world.benchmark import WORLD_SAMPLE, WORLD_TRAIN, WorldBenchmark, load_benchmark
from genattr.world.clipart import (
    DEFAULT_DATA_DIR,
    ClipartData,
    load_data,
    read_packed_models,
    save_png,
    write_packed,
)

if TYPE_CHECKING:
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import (
        StableDiffusionPipeline,
    )

logger = logging.getLogger(__name__)

MC_FORMAT_VERSION = 1
MC_IMAGES = "world_multiconcept{size}.npz"
MC_META = "world_multiconcept{size}.json"
SEED = 17
K = 4  # concepts per model
LAYOUT = {"object": 2, "style": 2}  # multi-concept models per mode
IMAGES_PER_PROMPT = 2


def multiconcept_cache_dir() -> Path:
    """$GENATTR_CACHE/world-multiconcept, else ~/.cache/genattr/world-multiconcept."""
    base = os.environ.get("GENATTR_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "genattr"
    )
    return Path(base).expanduser() / "world-multiconcept"


def train_options(k: int = K) -> dict[str, Any]:
    """The world benchmark's training options, steps x k (each concept about as many steps as
    a single-concept model)."""
    steps = cast(int, WORLD_TRAIN["max_train_steps"])
    return {**WORLD_TRAIN, "max_train_steps": steps * k}


def sample_options() -> dict[str, Any]:
    return {**WORLD_SAMPLE, "images_per_prompt": IMAGES_PER_PROMPT}


def token_name(token: str) -> str:
    """A token as a folder name: `<new2>` -> `new2`."""
    return token.strip("<>")


def choose_models(
    bench: WorldBenchmark,
    seed: int = SEED,
    k: int = K,
    layout: dict[str, int] | None = None,
) -> list[dict[str, Any]]:
    """The multi-concept models: id, mode and K concepts (test model, token, mode, category,
    exemplar indices, training-free prompts with the concept's token), from the world
    benchmark's test models, deterministically from `seed`."""
    layout = LAYOUT if layout is None else layout
    out = []
    for n_mode, (mode, n_models) in enumerate(layout.items()):
        pool = sorted(
            m["id"]
            for m in bench.models
            if m["split"] == "test" and m.get("case", m["mode"]) == mode
        )
        if len(pool) < n_models * k:
            raise GenattrError(f"{len(pool)} {mode} test models, {n_models} x {k} needed")
        picked = np.random.default_rng([seed, n_mode]).choice(pool, n_models * k, replace=False)
        by_id = {m["id"]: m for m in bench.models}
        for j in range(n_models):
            concepts = []
            for c, mid in enumerate(picked[j * k : (j + 1) * k]):
                m, token = by_id[str(mid)], f"<new{c + 1}>"
                concepts.append(
                    {
                        "test_model": m["id"],
                        "token": token,
                        "mode": m["mode"],
                        "category": m.get("category"),
                        "exemplars": [int(i) for i in m["exemplars"]],
                        "prompts": {p: with_token(v, token) for p, v in m["prompts"].items()},
                    }
                )
            out.append({"id": f"multi-{mode}-{j}", "mode": mode, "concepts": concepts})
    return out


def _key(spec: dict[str, Any], train: dict[str, Any], sample: dict[str, Any]) -> str:
    """Changes whenever anything that shapes the model's files changes."""
    text = json.dumps({"spec": spec, "train": train, "sample": sample}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _exemplar_paths(data: ClipartData, work: Path, concept: dict[str, Any]) -> list[Path]:
    folder = work / "exemplars" / concept["test_model"]
    paths = []
    for i in concept["exemplars"]:
        paths.append(Path(save_png(data.images[i], folder / f"{i:05d}.png")))
    return paths


def _concepts(data: ClipartData, work: Path, spec: dict[str, Any]) -> list[Any]:
    return [
        Concept(_exemplar_paths(data, work, c), c["mode"], c.get("category"), c["token"])
        for c in spec["concepts"]
    ]


def train_model(
    customizer: Customizer, data: ClipartData, work: Path, spec: dict[str, Any], k: int = K
) -> Any:
    """Tune the customizer's pipeline on the spec's concepts (in place) and save the model to
    `work/models/{id}`; the training statistics."""
    cfg = config_from_dict(train_options(k))
    stats = customizer.train_concepts(_concepts(data, work, spec), cfg)
    customizer.save(
        work / "models" / spec["id"],
        extra={"model_id": spec["id"], "train_seconds": round(stats.seconds, 3)},
    )
    return stats


def sample_concepts(
    pipe: StableDiffusionPipeline, out: Path, spec: dict[str, Any]
) -> dict[str, dict[str, list[str]]]:
    """Each concept's prompts sampled into `out/{token name}/{prompt type}/`; the image
    paths (relative to `out`) per token and prompt type."""
    cfg = sample_config_from_dict(sample_options())
    synth: dict[str, dict[str, list[str]]] = {}
    for c in spec["concepts"]:
        synth[c["token"]] = {}
        for ptype, prompts in c["prompts"].items():
            folder = out / token_name(c["token"]) / ptype
            record = {"model_id": spec["id"], "token": c["token"], "prompt_type": ptype}
            paths = _generate(pipe, prompts, folder, cfg, record)
            synth[c["token"]][ptype] = [str(p.relative_to(out)) for p in paths]
    return synth


def _generate(pipe: Any, prompts: list[str], folder: Path, cfg: Any, record: dict) -> list[Path]:
    paths, _ = generate_images(pipe, prompts, folder, cfg, record=record)
    return paths


def build_model(
    customizer: Customizer, data: ClipartData, work: Path, spec: dict[str, Any], k: int = K
) -> dict[str, Any]:
    """Train, save and sample one multi-concept model; its state record (written last)."""
    for p in (work / "models" / spec["id"], work / "synth" / spec["id"]):
        shutil.rmtree(p, ignore_errors=True)
    logger.info(
        "model %s: %s",
        spec["id"],
        ", ".join(f"{c['token']}={c['test_model']}" for c in spec["concepts"]),
    )
    stats = train_model(customizer, data, work, spec, k)
    logger.info("  trained %d steps in %.1f s, draws %s", stats.steps, stats.seconds, stats.draws)
    synth = sample_concepts(customizer.pipe, work / "synth" / spec["id"], spec)
    customizer.reset()
    state = {
        "kind": "genattr.world.multiconcept_model",
        "key": _key(spec, train_options(k), sample_options()),
        **spec,
        "train_steps": stats.steps,
        "train_seconds": round(stats.seconds, 3),
        "draws": dict(zip([c["token"] for c in spec["concepts"]], stats.draws, strict=True)),
        "train_prompts": list(customizer.prompts),
        "synth": synth,
    }
    write_text_atomic(work / "state" / f"{spec['id']}.json", json.dumps(state, indent=1))
    return state


def _complete(work: Path, spec: dict[str, Any], k: int) -> dict[str, Any] | None:
    path = work / "state" / f"{spec['id']}.json"
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    if state.get("key") != _key(spec, train_options(k), sample_options()):
        return None
    files = [p for per in state["synth"].values() for v in per.values() for p in v]
    synth = work / "synth" / spec["id"]
    model = work / "models" / spec["id"]
    if not files or not all((synth / f).is_file() for f in files):
        return None
    if not (model / "pytorch_custom_diffusion_weights.bin").is_file():
        return None
    return state


def build_multiconcept(
    work: str | os.PathLike,
    base: str | os.PathLike | None = None,
    data: ClipartData | None = None,
    bench: WorldBenchmark | None = None,
    models: Sequence[str] | None = None,
    *,
    seed: int = SEED,
    k: int = K,
    layout: dict[str, int] | None = None,
) -> list[dict[str, Any]]:
    """Build (or finish) every multi-concept model in `work`; their state records."""
    work = Path(work)
    data = data or load_data()
    bench = bench or load_benchmark()
    specs = choose_models(bench, seed, k, layout)
    if models is not None:
        unknown = sorted(set(models) - {s["id"] for s in specs})
        if unknown:
            raise GenattrError(f"no multi-concept model named {unknown}")
        specs = [s for s in specs if s["id"] in models]
    states, customizer = [], None
    for spec in specs:
        state = _complete(work, spec, k)
        if state is not None:
            logger.info("model %s: complete, skipped", spec["id"])
        else:
            if customizer is None:
                customizer = Customizer(load_world_base(base))
            state = build_model(customizer, data, work, spec, k)
        states.append(state)
    return states


def multiconcept_pipeline(
    model_id: str,
    work: str | os.PathLike | None = None,
    base: str | os.PathLike | None = None,
) -> StableDiffusionPipeline:
    """The world base with the multi-concept model `model_id` loaded (every token), rebuilt
    deterministically into `work` (default: the cache) if its folder is absent."""
    work = Path(work) if work is not None else multiconcept_cache_dir()
    folder = work / "models" / model_id
    if not (folder / "pytorch_custom_diffusion_weights.bin").is_file():
        build_multiconcept(work, base, models=[model_id])
    pipe = load_world_base(base)
    load_custom_diffusion(pipe, folder)
    return pipe


@dataclass
class MultiConceptBenchmark:
    """The packed test case: samples (N, S, S, 3) uint8 and one record per model, each with
    its concepts (test model, token, exemplar indices, prompts, `synth`: prompt type ->
    [start, count] into `images`)."""

    images: np.ndarray
    models: list[dict[str, Any]]
    info: dict[str, Any]

    def concepts(self) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        """(model, concept) for every concept of every model, in pack order."""
        return [(m, c) for m in self.models for c in m["concepts"]]


def pack_multiconcept(
    work: str | os.PathLike,
    out: str | os.PathLike = DEFAULT_DATA_DIR,
    size: int = 32,
    seed: int = SEED,
    k: int = K,
    *,
    layout: dict[str, int] | None = None,
) -> Path:
    """Pack the complete models of `work` into `out`'s npz + json."""
    work = Path(work)
    specs = choose_models(load_benchmark(), seed, k, layout)
    images: list[np.ndarray] = []
    models = []
    for spec in specs:
        state = _complete(work, spec, k)
        if state is None:
            raise GenattrError(f"{work}: model {spec['id']} is not built")
        concepts: list[dict[str, Any]] = []
        for c in spec["concepts"]:
            synth = {}
            for ptype, files in state["synth"][c["token"]].items():
                synth[ptype] = [len(images), len(files)]
                for f in files:
                    with Image.open(work / "synth" / spec["id"] / f) as im:
                        images.append(np.asarray(im.convert("RGB")))
            concepts.append(
                {
                    **c,
                    "train_prompt": state["train_prompts"][len(concepts)],
                    "draws": state["draws"][c["token"]],
                    "synth": synth,
                }
            )
        models.append(
            {
                "id": spec["id"],
                "mode": spec["mode"],
                "train_steps": state["train_steps"],
                "concepts": concepts,
            }
        )
    meta = {
        "kind": "genattr.world.multiconcept",
        "format_version": MC_FORMAT_VERSION,
        "seed": seed,
        "k": k,
        "layout": LAYOUT if layout is None else layout,
        "train": train_options(k),
        "sample": sample_options(),
        "models": models,
    }
    return write_packed(
        Path(out),
        meta_name=MC_META.format(size=size),
        img_name=MC_IMAGES.format(size=size),
        images=images,
        meta=meta,
        size=size,
    )


def load_multiconcept(
    directory: str | os.PathLike = DEFAULT_DATA_DIR, size: int = 32
) -> MultiConceptBenchmark:
    """The shipped (or rebuilt) multi-concept test case."""
    d = Path(directory)
    meta, models, images = read_packed_models(
        d / MC_META.format(size=size),
        d / MC_IMAGES.format(size=size),
        MC_FORMAT_VERSION,
        f"{d}: no multi-concept test case; run `python -m genattr.world.multiconcept build`",
        lambda m: sum(n for c in m["concepts"] for _, n in c["synth"].values()),
    )
    return MultiConceptBenchmark(images, models, meta)


def verify_model(
    model_id: str,
    work: str | os.PathLike,
    packed: MultiConceptBenchmark | None = None,
    tolerance: int = 1,
) -> int:
    """Rebuild `model_id` from nothing into `work` (its folder must not exist), load it from
    its files as a user would, sample every concept's prompts and compare with the pack (and
    the rebuild's own samples, made in the training pipeline, too); raises unless every pixel
    is within `tolerance` grey levels. The largest difference."""
    packed = packed or load_multiconcept()
    (model,) = [m for m in packed.models if m["id"] == model_id]
    work = Path(work)
    if (work / "models" / model_id).exists():
        raise GenattrError(f"{work / 'models' / model_id} exists: verify rebuilds from nothing")
    pipe = multiconcept_pipeline(model_id, work)
    worst = 0
    for c in model["concepts"]:
        spec = {"id": model_id, "concepts": [c]}
        synth = sample_concepts(pipe, work / "verify" / model_id, spec)
        for ptype, (start, count) in c["synth"].items():
            files = synth[c["token"]][ptype]
            assert len(files) == count
            for i, f in enumerate(files):
                want = packed.images[start + i].astype(int)
                for folder in (work / "verify" / model_id, work / "synth" / model_id):
                    with Image.open(folder / f) as im:
                        got = np.asarray(im.convert("RGB")).astype(int)
                    worst = max(worst, int(np.abs(got - want).max()))
    if worst > tolerance:
        raise GenattrError(f"{model_id}: rebuilt samples differ by {worst} grey levels")
    return worst


def _main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m genattr.world.multiconcept")
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build (resumably) every multi-concept model")
    b.add_argument("work", type=Path)
    b.add_argument("--pack", action="store_true", help="then pack into the package's data")
    b.add_argument("--models", nargs="*")
    v = sub.add_parser("verify", help="rebuild one model and compare with the pack")
    v.add_argument("work", type=Path)
    v.add_argument("model")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.cmd == "build":
        build_multiconcept(args.work, models=args.models)
        if args.pack:
            print(pack_multiconcept(args.work))
    else:
        worst = verify_model(args.model, args.work)
        print(f"{args.model}: rebuilt samples within {worst} grey level(s) of the pack")


if __name__ == "__main__":
    _main()
