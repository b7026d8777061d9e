"""Where backbone weights come from, and a content id for them.

Order, for every family: an explicit path; then a local cache (the Hugging Face hub cache for
hub models, the genattr weights directory or an installed package for single files); then the
network, only when the caller passed `allow_download=True` and HF_HUB_OFFLINE is not set.
A miss is one `GenattrError` that names the files and where to put them.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable
from pathlib import Path

import torch

from genattr.errors import GenattrError

_HUB_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_TRUE = {"1", "on", "yes", "true"}


def hf_hub_cache(cache_dir: str | os.PathLike | None = None) -> Path:
    """The hub cache directory, read from the environment at call time (not import time)."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface"
    )
    return Path(home).expanduser() / "hub"


def genattr_weights_dir() -> Path:
    """Directory for single-file weights (SSCD, MoCo): $GENATTR_WEIGHTS or ~/.cache/genattr."""
    if os.environ.get("GENATTR_WEIGHTS"):
        return Path(os.environ["GENATTR_WEIGHTS"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "genattr" / "weights"


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def hf_weight_files(directory: Path) -> list[Path]:
    """The weight files transformers loads from `directory` (safetensors first, as it does)."""
    index = directory / "model.safetensors.index.json"
    if (directory / "model.safetensors").is_file():
        return [directory / "model.safetensors"]
    if index.is_file():
        return [index, *sorted(directory.glob("model-*.safetensors"))]
    if (directory / "pytorch_model.bin").is_file():
        return [directory / "pytorch_model.bin"]
    return []


def resolve_hf_dir(
    spec: str | os.PathLike,
    *,
    backbone: str,
    allow_download: bool = False,
    cache_dir: str | os.PathLike | None = None,
) -> Path:
    """A local directory holding config.json and weights for `spec` (a path or a hub repo id)."""
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file() or not hf_weight_files(path):
            raise GenattrError(
                f"{path} is not a Hugging Face model directory for backbone {backbone!r}: it "
                f"needs config.json and model.safetensors (or pytorch_model.bin)"
            )
        return path
    repo_id = str(spec)
    if not _REPO_ID.match(repo_id):
        raise GenattrError(f"weights for backbone {backbone!r}: no such directory: {path}")
    cache = hf_hub_cache(cache_dir)
    found = _cached_hub_dir(repo_id, cache)
    if found is not None:
        return found
    if allow_download and not hub_offline():
        return _download_hub_dir(repo_id, cache, backbone)
    why = (
        "HF_HUB_OFFLINE is set"
        if allow_download
        else "downloading is off (pass allow_download=True to fetch it)"
    )
    raise GenattrError(
        f"weights for backbone {backbone!r} not found: Hugging Face repo {repo_id!r} is not in "
        f"the hub cache {cache}, and {why}. Either download config.json and model.safetensors "
        f"(or pytorch_model.bin) of {repo_id} into a directory and pass weights=DIRECTORY, or "
        f"on a machine with network run `hf download {repo_id} config.json model.safetensors` "
        f"(HF_HUB_CACHE={cache}) so they land in that cache."
    )


def _cached_hub_dir(repo_id: str, cache: Path) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    config = try_to_load_from_cache(repo_id, "config.json", cache_dir=cache)
    if not isinstance(config, str):
        return None
    for name in _HUB_WEIGHT_FILES:
        if isinstance(try_to_load_from_cache(repo_id, name, cache_dir=cache), str):
            return Path(config).parent
    return None


def _download_hub_dir(repo_id: str, cache: Path, backbone: str) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        config = hf_hub_download(repo_id, "config.json", cache_dir=cache)
        for name in _HUB_WEIGHT_FILES:
            try:
                hf_hub_download(repo_id, name, cache_dir=cache)
                return Path(config).parent
            except EntryNotFoundError as e:
                if isinstance(e, LocalEntryNotFoundError):  # unreachable, not absent
                    raise
                continue
    except Exception as e:  # network, auth, disk: one clear message
        raise GenattrError(
            f"could not download weights for backbone {backbone!r} from Hugging Face repo "
            f"{repo_id!r}: {e}"
        ) from e
    raise GenattrError(f"Hugging Face repo {repo_id!r} has neither of {_HUB_WEIGHT_FILES}")


def resolve_file(
    spec: str | os.PathLike | None,
    *,
    backbone: str,
    filename: str,
    url: str | None = None,
    packaged: Path | None = None,
    allow_download: bool = False,
) -> Path:
    """A single weights file: explicit path, then an installed package's copy, then the
    genattr weights directory, then `url` when downloading is allowed."""
    if spec is not None:
        path = Path(spec).expanduser()
        if path.is_file():
            return path
        raise GenattrError(f"weights file for backbone {backbone!r} not found: {path}")
    if packaged is not None and packaged.is_file():
        return packaged
    target = genattr_weights_dir() / filename
    if target.is_file():
        return target
    if allow_download and url is not None and not hub_offline():
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(url, str(target), progress=False)
        except Exception as e:
            raise GenattrError(f"could not download {url} for backbone {backbone!r}: {e}") from e
        return target
    where = f"put {filename} at {target} (or set GENATTR_WEIGHTS to its directory)"
    source = f"; it is published at {url}" if url else ""
    raise GenattrError(
        f"weights for backbone {backbone!r} not found: {where}, or pass weights=PATH{source}"
    )


_HASH_CACHE: dict[tuple[str, int, int], str] = {}


def file_sha256(path: Path) -> str:
    """Full sha256 hex digest of a file, memoised per (path, size, mtime) in this process."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _HASH_CACHE:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
        _HASH_CACHE[key] = digest.hexdigest()
    return _HASH_CACHE[key]


def weights_id(files: Iterable[Path]) -> str:
    """`sha256:<16 hex>` over the contents of `files` (names and order do not matter), so two
    copies of the same weights get the same id and any changed byte gives a new one."""
    digests = sorted(file_sha256(Path(f)) for f in files)
    if not digests:
        raise ValueError("weights_id needs at least one file")
    combined = digests[0] if len(digests) == 1 else hashlib.sha256("".join(digests).encode())
    hexdigest = combined if isinstance(combined, str) else combined.hexdigest()
    return f"sha256:{hexdigest[:16]}"
