"""The authors' torch `.pth` feature files (from `extract_feat.py`); their mapper checkpoints
are heads (`genattr.heads.checkpoint`).

Gallery file:   {"feats": FloatTensor[N, D], "paths": [str]}
Test-case file: {"exemplar_paths", "exemplar_chunks": [(start, end)] per model,
                 "exemplar_tensors": [E, D], "synth_paths": {ptype: [...]},
                 "synth_ids": {ptype: [model index per query]}, "synth_tensors": {ptype: [Q, D]}}
Loading memory-maps the tensors (zip-format files), so a 1M-image gallery costs no RAM upfront.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from genattr.atomic import atomic_path
from genattr.errors import GenattrError


@dataclass
class GalleryFeatures:
    """Features of the training images to search (the distractors in the AbC protocol)."""

    feats: torch.Tensor
    paths: list[str]

    @property
    def dim(self) -> int:
        return self.feats.shape[1]


@dataclass
class TestCaseFeatures:
    """Exemplars and synthesized queries of a benchmark, with which model made each query."""

    __test__ = False  # not a pytest test class despite its name

    exemplar_paths: list[str]
    exemplar_chunks: list[tuple[int, int]]
    exemplar_feats: torch.Tensor
    synth_paths: dict[str, list[str]]
    synth_ids: dict[str, list[int]]
    synth_feats: dict[str, torch.Tensor]

    @property
    def dim(self) -> int:
        return self.exemplar_feats.shape[1]

    @property
    def prompt_types(self) -> list[str]:
        return list(self.synth_feats)

    def select_models(self, models: set[int]) -> TestCaseFeatures:
        """The queries of only these models (a split); exemplar rows and ids stay as they are."""
        keep = {
            p: [i for i, m in enumerate(ids) if m in models] for p, ids in self.synth_ids.items()
        }
        return TestCaseFeatures(
            self.exemplar_paths,
            self.exemplar_chunks,
            self.exemplar_feats,
            {p: [v[i] for i in keep[p]] for p, v in self.synth_paths.items() if len(v)},
            {p: [self.synth_ids[p][i] for i in idx] for p, idx in keep.items()},
            {p: self.synth_feats[p][idx] for p, idx in keep.items()},
        )

    def validate(self) -> None:
        """Raise ValueError on anything the evaluation would silently get wrong."""
        n_ex, dim = _matrix_shape("exemplar_tensors", self.exemplar_feats)
        if len(self.exemplar_paths) not in (0, n_ex):
            raise ValueError(f"{len(self.exemplar_paths)} exemplar_paths for {n_ex} exemplar rows")
        for m, (start, end) in enumerate(self.exemplar_chunks):
            if not 0 <= start <= end <= n_ex:
                raise ValueError(f"exemplar_chunks[{m}] = ({start}, {end}) is outside 0..{n_ex}")
            if start == end:
                raise ValueError(f"model {m} has no exemplars (exemplar_chunks[{m}] is empty)")
        _check_finite("exemplar_tensors", self.exemplar_feats)
        n_models = len(self.exemplar_chunks)
        for ptype, feats in self.synth_feats.items():
            q, d = _matrix_shape(f"synth_tensors[{ptype!r}]", feats)
            if d != dim:
                raise ValueError(f"synth_tensors[{ptype!r}] has dim {d}, exemplars have {dim}")
            ids = self.synth_ids.get(ptype)
            if ids is None or len(ids) != q:
                n = None if ids is None else len(ids)
                raise ValueError(f"synth_ids[{ptype!r}] has {n} entries for {q} queries")
            bad = [i for i in ids if not 0 <= int(i) < n_models]
            if bad:
                raise ValueError(
                    f"synth_ids[{ptype!r}] refers to model {bad[0]}, but there are "
                    f"{n_models} models (exemplar_chunks)"
                )
            _check_finite(f"synth_tensors[{ptype!r}]", feats)


def _matrix_shape(name: str, t: Any) -> tuple[int, int]:
    if not isinstance(t, torch.Tensor) or t.ndim != 2:
        raise ValueError(f"{name} must be a 2-D tensor, got {type(t).__name__}")
    if not t.is_floating_point():  # complex would lose its imaginary part, ints their meaning
        raise ValueError(f"{name} must hold real floating-point features, not {t.dtype}")
    return t.shape[0], t.shape[1]


def _model_index(value: Any) -> int:
    """A model index as written: an integer (a float like 2.7 is refused, not truncated)."""
    if isinstance(value, torch.Tensor) and value.ndim == 0:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"synth_ids must be integers, found {value!r}")
    return int(value)


def _check_finite(name: str, t: torch.Tensor) -> None:
    bad = (~torch.isfinite(t)).any(dim=1).nonzero()
    if len(bad):
        raise ValueError(f"{name} has NaN or Inf values (first in row {bad[0].item()})")


def load_torch_dict(path: str | os.PathLike, what: str) -> dict:
    if not os.path.exists(path):
        raise GenattrError(f"{path}: no such file")
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):  # legacy (non-zip) files cannot be memory-mapped
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a foreign file fails anywhere in the unpickler (KeyError, ...)
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        foreign = not isinstance(e, RuntimeError | OSError | EOFError)
        if foreign or (isinstance(e, pickle.UnpicklingError) and "Weights only" in reason):
            reason = "not a torch.save file, or one holding more than tensors"
        raise GenattrError(f"{path}: cannot read as a torch {what} file ({reason})") from None
    if not isinstance(obj, dict):
        raise GenattrError(f"{path}: expected a dict in a {what} file, got {type(obj).__name__}")
    return obj


def require_keys(path, obj: dict, keys: tuple[str, ...], what: str) -> None:
    missing = [k for k in keys if k not in obj]
    if missing:
        raise GenattrError(f"{path}: not a {what} file (missing {', '.join(missing)})")


def load_gallery_pth(path: str | os.PathLike) -> GalleryFeatures:
    obj = load_torch_dict(path, "gallery feature")
    require_keys(path, obj, ("feats",), "gallery feature")
    feats = obj["feats"]
    try:
        n, _ = _matrix_shape("feats", feats)
        paths = list(obj.get("paths", []))
        if paths and len(paths) != n:
            raise ValueError(f"{len(paths)} paths for {n} feature rows")
    except ValueError as e:
        raise GenattrError(f"{path}: {e}") from None
    return GalleryFeatures(feats, [str(p) for p in paths])


def save_gallery_pth(gallery: GalleryFeatures, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        torch.save({"feats": gallery.feats.float(), "paths": list(gallery.paths)}, tmp)


_TESTCASE_KEYS = ("exemplar_chunks", "exemplar_tensors", "synth_ids", "synth_tensors")


def load_testcase_pth(path: str | os.PathLike) -> TestCaseFeatures:
    obj = load_torch_dict(path, "test-case feature")
    require_keys(path, obj, _TESTCASE_KEYS, "test-case feature")
    try:
        tc = TestCaseFeatures(
            exemplar_paths=[str(p) for p in obj.get("exemplar_paths", [])],
            exemplar_chunks=[(int(s), int(e)) for s, e in obj["exemplar_chunks"]],
            exemplar_feats=obj["exemplar_tensors"],
            synth_paths={k: [str(p) for p in v] for k, v in obj.get("synth_paths", {}).items()},
            synth_ids={k: [_model_index(i) for i in v] for k, v in obj["synth_ids"].items()},
            synth_feats=dict(obj["synth_tensors"]),
        )
        tc.validate()
    except (ValueError, TypeError) as e:
        raise GenattrError(f"{path}: {e}") from None
    return tc


def save_testcase_pth(tc: TestCaseFeatures, path: str | os.PathLike) -> None:
    obj = {
        "exemplar_paths": list(tc.exemplar_paths),
        "exemplar_chunks": [tuple(c) for c in tc.exemplar_chunks],
        "exemplar_tensors": tc.exemplar_feats.float(),
        "synth_paths": {k: list(v) for k, v in tc.synth_paths.items()},
        "synth_ids": {k: list(v) for k, v in tc.synth_ids.items()},
        "synth_tensors": {k: v.float() for k, v in tc.synth_feats.items()},
    }
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
