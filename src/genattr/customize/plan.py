"""Benchmark plans: which models to customize, from which exemplars, with which prompt sets.

A plan is YAML or JSON; relative paths in it resolve against the plan file's folder.

```yaml
name: abc-mini
base: CompVis/stable-diffusion-v1-4      # HF id (from your cache) or a local folder
device: auto                              # auto | cpu | cuda | cuda:1 ...
dtype: auto                               # auto (float16 on GPU) | float32 | float16 | bfloat16
train: {max_train_steps: 250}             # Custom Diffusion options (CustomizeConfig)
sample: {steps: 100, images_per_prompt: 4}  # sampling options (SampleConfig)
split: {train: 0.8, val: 0.1, test: 0.1}  # by model, stable under plan growth
prompt_sets: {object: [media, captions], style: [style-scene, style-object]}
captions: captions.yaml                   # {category: [sentences with <new1>]}
models:
  - {id: n01518878_0008, mode: object, category: bird, exemplars: [bird.jpg]}
  - {id: sisley, mode: style, exemplars: artists/sisley/, split: test}
  - {id: n01530575_0012, category: bird, exemplars: [b.jpg], sample: {images_per_prompt: 2}}
  - id: coco-set-00                       # a captioned set: each image tuned with its caption
    mode: captioned
    exemplars: coco/set-00/               # N images
    image_captions: coco/set-00.json      # {file name: caption}, or a list / text file in order
    heldout_captions: coco/heldout-00.txt # captions not in the set: prompt type "held-out"
    train: {freeze_model: crossattn}      # all of cross-attention (default: to_k/to_v only)
```
A model's own `train` or `sample` mapping overrides the plan's options for that model only.
Every key and the type of every value are checked when the plan is read (`PlanDocument`), so
a misspelt key or a value of the wrong shape stops the plan before any model loads.
A captioned set is sampled with its own captions (prompt type `set`) and, if given, with
`heldout_captions` (prompt type `held-out`); its own `prompts: {type: [sentences]}` replaces
both (e.g. a subset of a large set's captions).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from genattr.customize.config import CustomizeConfig, config_from_dict
from genattr.customize.examples import check_image, list_images
from genattr.customize.prompts import (
    PromptSet,
    _read_data,
    load_prompt_set,
    read_captions,
    read_image_captions,
)
from genattr.customize.sample import SampleConfig, sample_config_from_dict
from genattr.data.benchmark import MODES, SPLITS
from genattr.errors import GenattrError, validation_reason

PLAN_FORMAT_VERSION = 1
DEFAULT_PROMPT_SETS = {"object": ["media", "captions"], "style": ["style-scene", "style-object"]}
DEFAULT_SPLIT = {"train": 0.8, "val": 0.1, "test": 0.1}
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


Paths = str | list[str]
Fraction = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]
Options = dict[str, Any] | None  # the values are typed by CustomizeConfig / SampleConfig


class _Strict(BaseModel):
    # Unknown keys are errors (a misspelt `smaple:` is not silently ignored); YAML numbers
    # are accepted where a name is expected (`id: 001`).
    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True)


class PlanModelEntry(_Strict):
    """One entry of a plan's `models` list, as written (paths not yet resolved)."""

    id: str
    mode: str = "object"
    category: str | None = None
    exemplars: Paths
    split: str | None = None
    train: Options = None
    sample: Options = None
    reg_images: Paths | None = None
    reg_captions: Paths | None = None
    image_captions: Paths | dict[str, str] | None = None
    heldout_captions: Paths | None = None
    prompts: dict[str, list[str]] | None = None


class PlanDocument(_Strict):
    """The shape of a whole plan file: every field's type, checked in one place."""

    format_version: int = PLAN_FORMAT_VERSION
    name: str | None = None
    base: str
    device: str = "auto"
    dtype: str = "auto"
    train: Options = None
    sample: Options = None
    split: dict[str, Fraction] | None = None
    prompt_sets: dict[str, list[str]] | None = None
    captions: Paths | None = None
    models: list[PlanModelEntry]


@dataclass
class ModelSpec:
    """One model of a plan, with everything resolved (paths, prompts, options)."""

    id: str
    mode: str
    category: str | None
    exemplars: list[Path]
    split: str
    train: CustomizeConfig
    prompts: dict[str, list[str]]
    reg_images: list[Path] = field(default_factory=list)
    reg_captions: list[str] = field(default_factory=list)
    sample: SampleConfig | None = None  # this model's sampling options, None: the plan's
    captions: list[str] = field(default_factory=list)  # a captioned set's, one per exemplar

    def key(self, base: str, sample: SampleConfig) -> str:
        """Changes whenever anything that shapes this model's outputs changes."""
        h = hashlib.sha256()
        for p in [*self.exemplars, *self.reg_images]:
            h.update(p.read_bytes())
        spec = {
            "base": base,
            "mode": self.mode,
            "category": self.category,
            "train": self.train.record(),
            "sample": asdict(sample),
            "prompts": self.prompts,
            "reg_captions": self.reg_captions,
            "n_exemplars": len(self.exemplars),
            "n_reg": len(self.reg_images),
        }
        if self.captions:  # only captioned sets have them: other models keep their keys
            spec["captions"] = self.captions
        h.update(json.dumps(spec, sort_keys=True).encode())
        return h.hexdigest()


@dataclass
class Plan:
    name: str
    base: str
    device: str
    dtype: str
    sample: SampleConfig
    models: list[ModelSpec]
    source: dict[str, Any] = field(default_factory=dict)


def assign_split(model_id: str, fractions: dict[str, float]) -> str:
    """A split from the model id alone (a hash), so adding models never moves existing ones."""
    u = int(hashlib.sha256(model_id.encode()).hexdigest()[:12], 16) / 16**12
    acc = 0.0
    for name in SPLITS:
        acc += fractions.get(name, 0.0)
        if u < acc:
            return name
    return [s for s in SPLITS if fractions.get(s, 0.0) > 0][-1]


def _resolve(root: Path, value: Any, what: str) -> list[Path]:
    items = value if isinstance(value, list) else [value]
    if not items or not all(isinstance(v, str) for v in items):
        raise GenattrError(f"{what} must be a path or a list of paths")
    return [p if p.is_absolute() else root / p for p in map(Path, items)]


def _document(path: Path, data: Any) -> PlanDocument:
    if not isinstance(data, dict):
        raise GenattrError(f"{path}: a plan is a mapping")
    version = data.get("format_version", PLAN_FORMAT_VERSION)
    if version != PLAN_FORMAT_VERSION:
        raise GenattrError(f"{path}: format_version {version!r} is not supported")
    if not isinstance(data.get("base"), str) or not data["base"]:
        raise GenattrError(f"{path}: 'base' (the pretrained model) is required")
    if not isinstance(data.get("models"), list) or not data["models"]:
        raise GenattrError(f"{path}: 'models' must be a non-empty list")
    try:
        return PlanDocument.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = err["loc"]
        if len(loc) < 2 or loc[0] != "models" or not isinstance(loc[1], int):
            raise GenattrError(f"{path}: {validation_reason(e)}") from None
        entry = data["models"][loc[1]]
        name = entry.get("id") if isinstance(entry, dict) else None
        where = f"model {name!r}" if isinstance(name, str) else f"model {loc[1]}"
        if len(loc) == 2:
            raise GenattrError(f"{path}: {where}: must be a mapping") from None
        field = ".".join(str(part) for part in loc[2:])
        raise GenattrError(f"{path}: {where}: {field}: {err['msg']}") from None


def read_plan(path: str | os.PathLike) -> Plan:
    """Parse and check a plan; every error names the plan and the model."""
    path = Path(path)
    if path.suffix.lower() not in (".yaml", ".yml", ".json"):
        raise GenattrError(f"{path}: a plan is a .yaml or .json file")
    data = _read_data(path)
    doc = _document(path, data)
    root = path.resolve().parent
    base = doc.base
    if not Path(base).is_absolute() and (root / base).exists():
        base = str(root / base)
    train_defaults = doc.train or {}
    sample_defaults = doc.sample or {}
    try:
        sample = sample_config_from_dict(sample_defaults)
    except GenattrError as e:
        raise GenattrError(f"{path}: sample: {e}") from None
    fractions = doc.split or DEFAULT_SPLIT
    if set(fractions) - set(SPLITS):
        raise GenattrError(f"{path}: 'split' maps {SPLITS} to fractions")
    if abs(sum(fractions.values()) - 1.0) > 1e-6:
        raise GenattrError(f"{path}: split fractions must add up to 1")
    set_names = {**DEFAULT_PROMPT_SETS, **(doc.prompt_sets or {})}
    if set(set_names) - set(MODES):
        raise GenattrError(f"{path}: 'prompt_sets' maps modes ({', '.join(MODES)}) to lists")
    sets: dict[str, list[PromptSet]] = {}
    for mode in MODES:
        try:
            sets[mode] = [
                load_prompt_set(n if not n.endswith((".json", ".yaml", ".yml")) else root / n)
                for n in set_names.get(mode, [])
            ]
        except GenattrError as e:
            raise GenattrError(f"{path}: prompt_sets.{mode}: {e}") from None
    captions = None
    if doc.captions:
        try:
            captions = read_captions(_resolve(root, doc.captions, "captions")[0])
        except GenattrError as e:
            raise GenattrError(f"{path}: captions: {e}") from None
    models, seen = [], set()
    for i, m in enumerate(doc.models):
        where = f"{path}: model {i}"
        mid = m.id
        if not _ID.match(mid):
            raise GenattrError(f"{where}: 'id' must be a file-name-safe string, not {mid!r}")
        if mid in seen:
            raise GenattrError(f"{where}: duplicate id {mid!r}")
        seen.add(mid)
        where = f"{path}: model {mid!r}"
        try:
            models.append(
                _model_spec(root, m, train_defaults, sample_defaults, fractions, sets, captions)
            )
        except GenattrError as e:
            raise GenattrError(f"{where}: {e}") from None
    return Plan(
        name=doc.name or path.stem,
        base=base,
        device=doc.device,
        dtype=doc.dtype,
        sample=sample,
        models=models,
        source=data,
    )


def _model_spec(
    root: Path,
    m: PlanModelEntry,
    train_defaults: dict[str, Any],
    sample_defaults: dict[str, Any],
    fractions: dict[str, float],
    sets: dict[str, list[PromptSet]],
    captions: dict[str, list[str]] | None,
) -> ModelSpec:
    """One entry of the plan, resolved: exemplars listed and opened, options typed, prompts."""
    if m.mode not in MODES:
        raise GenattrError(f"mode must be one of {', '.join(MODES)}")
    if m.mode == "object" and not m.category:
        raise GenattrError("object models need a 'category'")
    split = m.split or assign_split(m.id, fractions)
    if split not in SPLITS:
        raise GenattrError(f"split must be one of {SPLITS}")
    exemplars = list_images(_resolve(root, m.exemplars, "exemplars"))
    for p in exemplars:
        check_image(p)  # a bad file stops the plan now, not hours into the run
    train = config_from_dict({**train_defaults, **(m.train or {})})
    model_sample = sample_config_from_dict({**sample_defaults, **m.sample}) if m.sample else None
    reg_images = list_images(_resolve(root, m.reg_images, "reg_images")) if m.reg_images else []
    reg_captions = _reg_captions(root, m.reg_captions, len(reg_images))
    image_captions: list[str] = []
    if m.mode == "captioned":
        if m.image_captions is None:
            raise GenattrError("a captioned set needs 'image_captions'")
        image_captions = read_image_captions(m.image_captions, exemplars, root)
        prompts = _captioned_prompts(root, m, image_captions)
    else:
        for key in ("image_captions", "heldout_captions", "prompts"):
            if key in m.model_fields_set:
                raise GenattrError(f"'{key}' is for captioned sets only")
        prompts = {}
        for ps in sets[m.mode]:
            if ps.prompt_type in prompts:
                raise GenattrError(f"two prompt sets of type {ps.prompt_type!r}")
            prompts[ps.prompt_type] = ps.render(m.category, captions)
    return ModelSpec(
        m.id,
        m.mode,
        m.category,
        exemplars,
        split,
        train,
        prompts,
        reg_images,
        reg_captions,
        model_sample,
        image_captions,
    )


def _captioned_prompts(
    root: Path, m: PlanModelEntry, image_captions: list[str]
) -> dict[str, list[str]]:
    """A captioned set's prompts: its own `prompts` mapping, else its captions (`set`) and its
    held-out captions (`held-out`) if it has them."""
    own = m.prompts
    if own is not None:
        if not own:
            raise GenattrError("'prompts' maps prompt types to lists of sentences")
        for ptype, sentences in own.items():
            if not _ID.match(ptype) or not sentences:
                raise GenattrError(f"prompts.{ptype}: a non-empty list under a file-name-safe type")
            if not all(x.strip() for x in sentences):
                raise GenattrError(f"prompts.{ptype}: sentences must be non-empty strings")
        return {k: [x.strip() for x in v] for k, v in own.items()}
    prompts = {"set": image_captions}
    heldout = m.heldout_captions
    if heldout is not None:
        if isinstance(heldout, str):
            path = root / heldout
            if not path.is_file():
                raise GenattrError(f"heldout_captions: {path}: no such file")
            heldout = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
        if not isinstance(heldout, list) or not heldout:
            raise GenattrError("heldout_captions: a text file or a non-empty list of captions")
        prompts["held-out"] = [str(x).strip() for x in heldout]
    return prompts


def _reg_captions(root: Path, value: Paths | None, n: int) -> list[str]:
    if n == 0:
        if value:
            raise GenattrError("reg_captions given without reg_images")
        return []
    if value is None:
        raise GenattrError("reg_images need reg_captions (a file, a list, or one prompt)")
    if isinstance(value, list):
        caps = list(value)
    elif (root / str(value)).is_file():
        caps = [ln.strip() for ln in (root / str(value)).read_text().splitlines() if ln.strip()]
    else:
        caps = [str(value)]
    if len(caps) == 1:
        caps = caps * n
    if len(caps) != n:
        raise GenattrError(f"{n} regularization images but {len(caps)} captions")
    return caps
