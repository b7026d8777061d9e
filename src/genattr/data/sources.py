"""Image collections: what to read, in a fixed order, with an id and metadata for each image.

`open_source(spec)` understands four kinds:
  folder      a directory, walked recursively; image files sorted by relative path (the id)
  list        a text file of image paths, one a line (blank lines and `#` comments skipped)
  tar         webdataset shards: `x.tar`, a glob `shards/*.tar` or a brace range
              `shards/{000..009}.tar`; members grouped by key (the basename up to its first
              dot), one image per key; a `.txt`/`.caption` member becomes the caption
  abc_json    the authors' AbC test-case JSON (or a genattr manifest): exemplars, then synth
              images per prompt type, in the order of their extract_feat.py
Relative paths in list and JSON files are read from `root` when given; otherwise from the
current directory (the authors' convention), falling back to the file's own folder.

A source is columnar (plain lists), so a million items pickle fast into decode workers.
Problems found while listing (a repeated id, a tar sample with no image) are kept as
`prefailed` reasons: the extraction records them as failures instead of dropping them.
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from genattr.data.benchmark import read_benchmark
from genattr.data.images import IMAGE_EXTENSIONS
from genattr.errors import GenattrError

SOURCE_KINDS = ("folder", "list", "tar", "abc_json")
_CAPTION_EXTS = ("txt", "caption")


@dataclass
class ImageSource:
    kind: str
    location: str
    ids: list[str]
    paths: list[str]  # as recorded in metadata (as written in a list/JSON file)
    files: list[str]  # what to open: a file path, or the tar file for tar members
    offsets: list[int] | None = None  # tar: byte offset of each member's data
    sizes: list[int] | None = None
    columns: dict[str, list[Any]] = field(default_factory=dict)
    prefailed: dict[int, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)

    def read_bytes(self, i: int) -> bytes:
        """The encoded image i (raises OSError when it cannot be read)."""
        if self.offsets is None:
            with open(self.files[i], "rb") as f:
                return f.read()
        assert self.sizes is not None, "a tar source records both offsets and sizes"
        with open(self.files[i], "rb") as f:
            f.seek(self.offsets[i])
            data = f.read(self.sizes[i])
        if len(data) != self.sizes[i]:
            raise OSError(f"tar member cut short ({len(data)} of {self.sizes[i]} bytes)")
        return data

    def fingerprint(self) -> str:
        """Identifies the item list: a resumed extraction must see the same one."""
        h = hashlib.sha256(self.kind.encode())
        for i, p in zip(self.ids, self.paths, strict=True):
            h.update(b"\0" + i.encode() + b"\1" + (p if self.kind != "folder" else "").encode())
        return h.hexdigest()

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "location": self.location,
            "count": len(self),
            "fingerprint": self.fingerprint(),
        }


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _mark_duplicates(ids: list[str], prefailed: dict[int, str]) -> None:
    seen: dict[str, int] = {}
    for i, key in enumerate(ids):
        if key in seen:
            prefailed.setdefault(i, f"duplicate id {key!r} (first at item {seen[key]})")
        else:
            seen[key] = i


def folder_source(folder: str | os.PathLike, exclude: str | os.PathLike | None = None):
    """Every image file under `folder` (hidden files and folders skipped), sorted by id."""
    root = Path(folder)
    skip = Path(exclude).resolve() if exclude is not None else None
    rels = []
    for dirpath, dirnames, filenames in os.walk(root):
        d = Path(dirpath)
        dirnames[:] = [
            n
            for n in dirnames
            if not n.startswith(".") and (skip is None or (d / n).resolve() != skip)
        ]
        rels += [
            (d / n).relative_to(root).as_posix()
            for n in filenames
            if not n.startswith(".") and _is_image_name(n)
        ]
    rels.sort()
    files = [str(root / r) for r in rels]
    return ImageSource("folder", str(folder), rels, list(files), files)


def _resolver(base: Path, root: str | os.PathLike | None):
    def resolve(p: str) -> str:
        if os.path.isabs(p):
            return p
        if root is not None:
            return str(Path(root) / p)
        return p if os.path.exists(p) else str(base / p)

    return resolve


def list_source(list_file: str | os.PathLike, root: str | os.PathLike | None = None):
    """Paths from a text file, in file order; the id is the path as written."""
    try:
        lines = Path(list_file).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise GenattrError(f"{list_file}: cannot read the list of images ({e})") from None
    paths = [s for s in (line.strip() for line in lines) if s and not s.startswith("#")]
    resolve = _resolver(Path(list_file).parent, root)
    src = ImageSource("list", str(list_file), list(paths), paths, [resolve(p) for p in paths])
    _mark_duplicates(src.ids, src.prefailed)
    return src


def abc_json_source(json_file: str | os.PathLike, root: str | os.PathLike | None = None):
    """An AbC test case: exemplars (model by model), then each prompt type's synth images."""
    manifest = read_benchmark(json_file)
    resolve = _resolver(Path(json_file).parent, root)
    ptypes = manifest.prompt_types
    ids, paths = [], []
    cols: dict[str, list[Any]] = {
        k: [] for k in ("role", "model_index", "class_id", "category", "prompt_type")
    }

    def add(id_, path, role, m, model, ptype):
        ids.append(id_)
        paths.append(path)
        for k, v in zip(cols, (role, m, model.id, model.category, ptype), strict=True):
            cols[k].append(v)

    row = 0
    for m, model in enumerate(manifest.models):
        for p in model.exemplars:
            add(f"exemplar/{row}", p, "exemplar", m, model, None)
            row += 1
    for ptype in ptypes:
        row = 0
        for m, model in enumerate(manifest.models):
            for p in model.synth.get(ptype, []):
                add(f"synth/{ptype}/{row}", p, "synth", m, model, ptype)
                row += 1
    extra = {"testcase": {"n_models": len(manifest.models), "prompt_types": ptypes}}
    return ImageSource(
        "abc_json",
        str(json_file),
        ids,
        paths,
        [resolve(p) for p in paths],
        columns=cols,
        extra=extra,
    )


def _expand_braces(spec: str) -> list[str]:
    m = re.search(r"\{(\d+)\.\.(\d+)\}", spec)
    if not m:
        return [spec]
    a, b = m.group(1), m.group(2)
    width = len(a) if a.startswith("0") else 0
    out = []
    for k in range(int(a), int(b) + 1):
        out += _expand_braces(spec[: m.start()] + str(k).zfill(width) + spec[m.end() :])
    return out


def tar_files(spec: str) -> list[str]:
    """Expand a tar spec (path, glob or {a..b} range) to existing files, in order."""
    out = []
    for s in _expand_braces(spec):
        out += sorted(glob.glob(s)) if glob.has_magic(s) else [s]
    missing = [p for p in out if not os.path.isfile(p)]
    if not out or missing:
        raise GenattrError(f"{spec}: no such tar file ({missing[0] if missing else 'no match'})")
    return out


def tar_source(spec: str):
    """Webdataset shards: one item per key holding an image member, in tar order."""
    ids: list[str] = []
    paths: list[str] = []
    files: list[str] = []
    offsets: list[int] = []
    sizes: list[int] = []
    cols: dict[str, list[Any]] = {"tar": [], "member": [], "key": [], "caption": []}
    prefailed: dict[int, str] = {}
    for tar_path in tar_files(spec):
        samples: dict[str, dict[str, tarfile.TarInfo]] = {}
        try:
            with tarfile.open(tar_path, "r:") as tf:
                captions: dict[str, str] = {}
                for info in tf:
                    if not info.isfile():
                        continue
                    base = info.name.rsplit("/", 1)[-1]
                    if base.startswith(".") or "." not in base:
                        continue
                    key, ext = base.split(".", 1)
                    samples.setdefault(key, {})[ext.lower()] = info
                    if ext.lower() in _CAPTION_EXTS:
                        member = tf.extractfile(info)
                        assert member is not None  # a regular file (isfile above) always has data
                        data = member.read()
                        captions[key] = data.decode("utf-8", errors="replace").strip()
        except tarfile.ReadError as e:
            raise GenattrError(
                f"{tar_path}: not a readable uncompressed tar ({e}); webdataset shards are "
                "plain .tar files"
            ) from None
        for key, members in samples.items():
            image = next((m for ext, m in members.items() if _is_image_name("." + ext)), None)
            i = len(ids)
            ids.append(key)
            files.append(tar_path)
            if image is None:
                exts = ", ".join(sorted(members))
                prefailed[i] = f"no image member in this webdataset sample (has {exts})"
                name, off, size = next(iter(members.values())).name, 0, 0
            else:
                name, off, size = image.name, image.offset_data, image.size
            paths.append(f"{tar_path}/{name}")
            offsets.append(off)
            sizes.append(size)
            for k, v in zip(cols, (tar_path, name, key, captions.get(key)), strict=True):
                cols[k].append(v)
    src = ImageSource("tar", spec, ids, paths, files, offsets, sizes, cols, prefailed)
    _mark_duplicates(src.ids, src.prefailed)
    return src


def with_views(source: ImageSource, views: int) -> ImageSource:
    """Each image `views` times in a row: item i*views + k is view k of image i (k=0 as is)."""
    if views == 1:
        return source
    rep = lambda xs: [x for x in xs for _ in range(views)]  # noqa: E731
    columns = {k: rep(v) for k, v in source.columns.items()}
    columns["view"] = list(range(views)) * len(source)
    return ImageSource(
        kind=source.kind,
        location=source.location,
        ids=[f"{i}#v{k}" if k else i for i in source.ids for k in range(views)],
        paths=rep(source.paths),
        files=rep(source.files),
        offsets=None if source.offsets is None else rep(source.offsets),
        sizes=None if source.sizes is None else rep(source.sizes),
        columns=columns,
        prefailed={i * views + k: r for i, r in source.prefailed.items() for k in range(views)},
        extra={**source.extra, "views": views},
    )


def open_source(
    spec: str | os.PathLike,
    *,
    root: str | os.PathLike | None = None,
    exclude: str | os.PathLike | None = None,
) -> ImageSource:
    """Tell the kind of `spec` from what it is and list its images."""
    s = str(spec)
    if os.path.isdir(s):
        return folder_source(s, exclude=exclude)
    pattern = "{" in s or glob.has_magic(s)
    if s.endswith(".tar") or (".tar" in os.path.basename(s) and pattern):
        return tar_source(s)
    if not os.path.exists(s):
        raise GenattrError(f"{s}: no such file or folder")
    if s.lower().endswith(".json"):
        return abc_json_source(s, root)
    if _is_image_name(s):
        raise GenattrError(f"{s}: is an image; pass its folder or a text file listing images")
    return list_source(s, root)
