"""Benchmark test cases: the authors' AbC JSON and genattr's versioned manifest.

Both describe the same thing, one customized model per entry: its exemplars (the ground truth)
and the images synthesized from it, grouped by prompt type. The manifest adds what the official
JSON leaves implicit (model id, object/style mode, train/val/test split) and a format version.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from genattr.atomic import write_text_atomic
from genattr.errors import GenattrError, validation_reason

MANIFEST_FORMAT_VERSION = 1
MODES = ("object", "style", "captioned")  # captioned: a set of images, each with its caption
SPLITS = ("train", "val", "test")


@dataclass
class CustomizedModel:
    """One customized model: the exemplars it was tuned on and what it synthesized."""

    id: str
    exemplars: list[str]
    synth: dict[str, list[str]]
    category: str | None = None
    mode: str = "object"
    split: str = "test"
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class BenchmarkManifest:
    name: str
    models: list[CustomizedModel]

    @property
    def prompt_types(self) -> list[str]:
        seen: dict[str, None] = {}
        for model in self.models:
            seen.update(dict.fromkeys(model.synth))
        return list(seen)

    def split(self, name: str) -> BenchmarkManifest:
        return BenchmarkManifest(f"{self.name}:{name}", [m for m in self.models if m.split == name])


def _fail(path: str | os.PathLike, msg: str) -> GenattrError:
    return GenattrError(f"{path}: {msg}")


def _read_json(path: str | os.PathLike) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise _fail(path, "no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _fail(path, f"not valid JSON ({e})") from None


def _str_list(path, where: str, value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _fail(path, f"{where} must be a list of paths")
    return value


def read_abc_json(path: str | os.PathLike, split: str = "test") -> BenchmarkManifest:
    """Read the authors' test-case JSON (a list of {exemplar, synth, category, class_id})."""
    return _parse_abc(_read_json(path), path, split)


def _parse_abc(data: Any, path: str | os.PathLike, split: str) -> BenchmarkManifest:
    if not isinstance(data, list):
        raise _fail(path, "expected a list with one entry per customized model")
    models = []
    for i, entry in enumerate(data):
        if not isinstance(entry, dict) or "exemplar" not in entry or "synth" not in entry:
            raise _fail(path, f"entry {i} lacks 'exemplar' or 'synth'")
        synth = entry["synth"]
        if not isinstance(synth, dict):
            raise _fail(path, f"entry {i}: 'synth' must map prompt type to a list of paths")
        category = entry.get("category")
        models.append(
            CustomizedModel(
                id=str(entry.get("class_id", i)),
                exemplars=_str_list(path, f"entry {i} 'exemplar'", entry["exemplar"]),
                synth={k: _str_list(path, f"entry {i} synth[{k!r}]", v) for k, v in synth.items()},
                category=category,
                mode="style" if category is None else "object",
                split=split,
            )
        )
    return BenchmarkManifest(Path(path).stem, models)


def write_abc_json(manifest: BenchmarkManifest, path: str | os.PathLike) -> None:
    """Write the authors' layout, so their `extract_feat.py --json` reads genattr benchmarks."""
    data = [
        {"exemplar": m.exemplars, "synth": m.synth, "class_id": m.id, "category": m.category}
        for m in manifest.models
    ]
    write_text_atomic(path, json.dumps(data, indent=1))


def read_manifest(path: str | os.PathLike) -> BenchmarkManifest:
    return _parse_manifest(_read_json(path), path)


class _ModelEntry(BaseModel):
    """One entry of a manifest's `models`, as read: types checked, nothing coerced."""

    model_config = ConfigDict(strict=True, extra="forbid")

    id: str
    exemplars: Annotated[list[str], Field(min_length=1)]
    synth: dict[str, list[str]]
    category: str | None = None
    mode: Literal["object", "style", "captioned"] = "object"
    split: Literal["train", "val", "test"] = "test"
    extra: dict[str, Any] = {}


class ManifestHeader(BaseModel):
    """A genattr benchmark manifest as read (its models checked one by one)."""

    model_config = ConfigDict(extra="allow")

    kind: Literal["genattr.benchmark"]
    format_version: Literal[1]
    name: str | None = None
    models: Annotated[list[_ModelEntry], Field(min_length=1)]


def _parse_manifest(data: Any, path: str | os.PathLike) -> BenchmarkManifest:
    if not isinstance(data, dict) or data.get("kind") != "genattr.benchmark":
        raise _fail(path, "not a genattr benchmark manifest (kind != 'genattr.benchmark')")
    version = data.get("format_version")
    if version != MANIFEST_FORMAT_VERSION:
        raise _fail(path, f"format_version {version!r} is not supported (expected 1)")
    try:
        header = ManifestHeader.model_validate(data)
    except ValidationError as e:
        raise _fail(path, validation_reason(e)) from None
    models = [CustomizedModel(**m.model_dump()) for m in header.models]
    return BenchmarkManifest(header.name or Path(path).stem, models)


def write_manifest(manifest: BenchmarkManifest, path: str | os.PathLike) -> None:
    data = {
        "kind": "genattr.benchmark",
        "format_version": MANIFEST_FORMAT_VERSION,
        "name": manifest.name,
        "models": [asdict(m) for m in manifest.models],
    }
    write_text_atomic(path, json.dumps(data, indent=1))


def read_benchmark(path: str | os.PathLike) -> BenchmarkManifest:
    """Either format, told apart by content: a list is official AbC JSON, an object a manifest."""
    data = _read_json(path)
    return _parse_abc(data, path, "test") if isinstance(data, list) else _parse_manifest(data, path)
