"""Image collections: what to read, in a fixed order, with an id and metadata for each image.

`open_source(spec)` understands four kinds:
  folder      a directory, walked recursively; image files sorted by relative path (the id).
              An image is a regular file (or a symlink to one) with an image extension, or
              with another or no extension whose first bytes are an image's (PNG, JPEG, GIF,
              BMP, WEBP, TIFF, ICO). Symlinked folders are followed, each folder walked once
              (by device and inode: a loop or a second link to a folder is skipped). Every
              entry seen is an item (later stored or failed) or skipped with a reason:
              `skipped`, `folders` and `listing()` account for them all. Entries named like
              an image that cannot be one (a FIFO, a socket, a device, a broken symlink) are
              items that fail, never opened; other such entries are skipped.
  list        a text file of image paths, one a line (blank lines and `#` comments skipped)
  tar         webdataset shards: `x.tar`, a glob `shards/*.tar` or a brace range
              `shards/{000..009}.tar`; members grouped by key (the basename up to its first
              dot), one image per key; a `.txt`/`.caption` member becomes the caption
  abc_json    the authors' AbC test-case JSON (or a genattr manifest): exemplars, then synth
              images per prompt type, in the order of their extract_feat.py
Relative paths in list and JSON files are read from `root` when given; otherwise from the
current directory (the authors' convention), falling back to the file's own folder.

A source is columnar (plain lists), so a million items pickle fast into decode workers.
Problems found while listing (a repeated id, a tar sample with no image, a FIFO named x.png)
are kept as `prefailed` reasons: the extraction records them as failures instead of dropping
them. Names are whatever bytes the file system holds: `files` keeps the real path (a str with
surrogate escapes, as os.walk gives it), ids and `paths` a printable form (`display_name`:
undecodable bytes as \\xNN), since parquet and JSON need valid UTF-8.
`read_bytes` opens regular files only and reads at most `max_bytes` of each.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import re
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from genattr.data.benchmark import read_benchmark
from genattr.data.files import (
    ItemRefused,
    not_regular_reason,
    read_regular_file,
    sniff_file,
    too_large_reason,
)
from genattr.data.images import IMAGE_EXTENSIONS
from genattr.data.names import PATH_BYTES, display_name, path_bytes_column
from genattr.errors import GenattrError

SOURCE_KINDS = ("folder", "list", "tar", "abc_json")
_CAPTION_EXTS = ("txt", "caption")
_MAX_CAPTION_BYTES = 1 << 20  # a caption member is read at listing time: bounded
# what a folder or tar calls an image by name: the decoder's formats, plus other spellings of
# JPEG and the formats Pillow reads that images.py does not list
IMAGE_NAME_EXTENSIONS = (*IMAGE_EXTENSIONS, ".jfif", ".jpe", ".jif", ".ico", ".pbm", ".pnm")
SKIP_HIDDEN = "hidden"
SKIP_NOT_IMAGE = "not an image"
SKIP_WALKED = "folder already walked (a symlink loop or a second link to it)"
SKIP_OUTPUT = "the output store"


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
    # entries seen while listing that are not items: (printable path, reason)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    folders: int = 0  # sub-folders walked (folder sources)

    def __len__(self) -> int:
        return len(self.ids)

    def listing(self) -> dict[str, Any]:
        """What the listing saw: items (images, before views), folders walked, and the
        entries skipped, counted by reason; items + folders + skipped = every entry seen."""
        counts = Counter(reason for _, reason in self.skipped)
        return {
            "items": len(self) // int(self.extra.get("views", 1)),
            "folders": self.folders,
            "skipped": dict(sorted(counts.items())),
        }

    def read_bytes(self, i: int, max_bytes: int | None = None) -> bytes:
        """The encoded image i, at most `max_bytes` of it.

        Raises ItemRefused (not a regular file, larger than max_bytes) or OSError."""
        if self.offsets is None:
            return read_regular_file(self.files[i], max_bytes)
        assert self.sizes is not None, "a tar source records both offsets and sizes"
        if max_bytes is not None and self.sizes[i] > max_bytes:
            raise ItemRefused(too_large_reason(self.sizes[i], max_bytes))
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
    return name.lower().endswith(IMAGE_NAME_EXTENSIONS)


def _mark_duplicates(ids: list[str], prefailed: dict[int, str]) -> None:
    seen: dict[str, int] = {}
    for i, key in enumerate(ids):
        if key in seen:
            prefailed.setdefault(i, f"duplicate id {key!r} (first at item {seen[key]})")
        else:
            seen[key] = i


def _dir_key(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


class _FolderWalk:
    """One walk of a folder: items (relative paths, some failed), skipped entries, folders."""

    def __init__(self, root: Path, exclude: tuple[int, int] | None):
        self.root, self.exclude = root, exclude
        self.items: list[str] = []
        self.failed: dict[str, str] = {}
        self.skipped: list[tuple[str, str]] = []
        self.folders = 0
        self.visited: set[tuple[int, int]] = set()

    def skip(self, rel: str, reason: str) -> None:
        self.skipped.append((rel, reason))

    def item(self, rel: str, reason: str | None = None) -> None:
        self.items.append(rel)
        if reason is not None:
            self.failed[rel] = reason

    def bad(self, rel: str, name: str, reason: str) -> None:
        """An entry that cannot be read: a failed item if its name says image, else skipped."""
        if _is_image_name(name):
            self.item(rel, reason)
        else:
            self.skip(rel, reason)

    def run(self) -> None:
        """Real sub-folders first, then symlinked ones, so that a folder reached both ways is
        walked as itself and its link is the one skipped."""
        self.visited.add(_dir_key(os.stat(self.root)))
        real: list[str] = []
        linked: list[str] = []
        self._scan("", real, linked, top=True)
        while real or linked:
            rel = real.pop() if real else linked.pop(0)
            try:
                key = _dir_key(os.stat(self.root / rel))
            except OSError as e:
                self.skip(rel, f"cannot read folder: {e.strerror or e}")
                continue
            if key in self.visited:
                self.skip(rel, SKIP_WALKED)
                continue
            if key == self.exclude:
                self.skip(rel, SKIP_OUTPUT)
                continue
            self.visited.add(key)
            self._scan(rel, real, linked)

    def _scan(self, rel_dir: str, real: list[str], linked: list[str], top: bool = False) -> None:
        d = self.root / rel_dir if rel_dir else self.root
        try:
            with os.scandir(d) as it:
                entries = sorted(it, key=lambda entry: entry.name)
        except OSError as err:
            if top:
                raise
            self.skip(rel_dir, f"cannot read folder: {err.strerror or err}")
            return
        if not top:
            self.folders += 1
        subdirs: list[str] = []
        for entry in entries:
            name = entry.name
            rel = f"{rel_dir}/{name}" if rel_dir else name
            if name.startswith("."):
                self.skip(rel, SKIP_HIDDEN)
                continue
            try:
                if entry.is_dir():  # follows symlinks
                    (linked if entry.is_symlink() else subdirs).append(rel)
                elif entry.is_file():  # a regular file, or a symlink to one
                    self._file(rel, name, entry.path)
                else:
                    self._special(rel, name, entry)
            except OSError as err:
                self.bad(rel, name, f"cannot read: {err.strerror or err}")
        real.extend(reversed(subdirs))  # popped in name order

    def _file(self, rel: str, name: str, path: str) -> None:
        if _is_image_name(name):
            self.item(rel)
            return
        try:
            fmt = sniff_file(path)
        except ItemRefused as e:  # replaced by a FIFO since the listing
            self.skip(rel, str(e))
            return
        except OSError as e:
            self.skip(rel, f"cannot read to tell whether it is an image: {e.strerror or e}")
            return
        if fmt is None:
            self.skip(rel, SKIP_NOT_IMAGE)
        else:
            self.item(rel)

    def _special(self, rel: str, name: str, e: os.DirEntry) -> None:
        try:
            mode = e.stat().st_mode
        except FileNotFoundError:
            if e.is_symlink():
                self.bad(rel, name, "broken symlink (its target does not exist)")
                return
            raise
        except OSError as err:
            if e.is_symlink():
                self.bad(rel, name, f"symlink that cannot be followed: {err.strerror or err}")
                return
            raise
        self.bad(rel, name, not_regular_reason(mode))


def folder_source(folder: str | os.PathLike, exclude: str | os.PathLike | None = None):
    """Every image under `folder`, sorted by id; hidden entries skipped (see the module doc).

    `exclude` (the output store, when it lies inside) is skipped."""
    root = Path(folder)
    skip = None
    if exclude is not None:
        with contextlib.suppress(OSError):
            skip = _dir_key(os.stat(exclude))
    try:
        walk = _FolderWalk(root, skip)
        walk.run()
    except OSError as e:
        shown = display_name(str(folder))
        raise GenattrError(f"{shown}: cannot list this folder ({e.strerror or e})") from None
    rels = sorted(walk.items, key=lambda r: (display_name(r), r))
    files = [str(root / r) for r in rels]
    src = ImageSource(
        "folder",
        display_name(str(folder)),
        [display_name(r) for r in rels],
        [display_name(f) for f in files],
        files,
        skipped=[(display_name(str(root / r)), reason) for r, reason in walk.skipped],
        folders=walk.folders,
    )
    src.prefailed = {i: walk.failed[r] for i, r in enumerate(rels) if r in walk.failed}
    _mark_duplicates(src.ids, src.prefailed)  # two names that print the same
    _keep_path_bytes(src)
    return src


def _keep_path_bytes(src: ImageSource) -> None:
    raw = path_bytes_column(src.files)
    if raw is not None:
        src.columns[PATH_BYTES] = raw


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
        # file names as the file system spells them: bytes that are not UTF-8 are kept (as
        # surrogate escapes, like os.listdir) to open the file, and printed as \\xNN in ids
        lines = os.fsdecode(Path(list_file).read_bytes()).splitlines()
    except OSError as e:
        raise GenattrError(f"{list_file}: cannot read the list of images ({e})") from None
    written = [s for s in (line.strip() for line in lines) if s and not s.startswith("#")]
    resolve = _resolver(Path(list_file).parent, root)
    names = [display_name(p) for p in written]
    src = ImageSource("list", str(list_file), names, list(names), [resolve(p) for p in written])
    _mark_duplicates(src.ids, src.prefailed)
    _keep_path_bytes(src)
    return src


def abc_json_source(json_file: str | os.PathLike, root: str | os.PathLike | None = None):
    """An AbC test case: exemplars (model by model), then each prompt type's synth images."""
    manifest = read_benchmark(json_file)
    resolve = _resolver(Path(json_file).parent, root)
    ptypes = manifest.prompt_types
    ids: list[str] = []
    paths: list[str] = []
    shown: list[str] = []  # paths as recorded: printable (a JSON string may hold \\udcXX)
    cols: dict[str, list[Any]] = {
        k: [] for k in ("role", "model_index", "class_id", "category", "prompt_type")
    }

    def _add(id_, path, role, m, model, ptype):
        ids.append(id_)
        paths.append(path)
        shown.append(display_name(path))
        for k, v in zip(cols, (role, m, model.id, model.category, ptype), strict=True):
            cols[k].append(v)

    row = 0
    for m, model in enumerate(manifest.models):
        for p in model.exemplars:
            _add(f"exemplar/{row}", p, "exemplar", m, model, None)
            row += 1
    for ptype in ptypes:
        row = 0
        for m, model in enumerate(manifest.models):
            for p in model.synth.get(ptype, []):
                _add(f"synth/{ptype}/{row}", p, "synth", m, model, ptype)
                row += 1
    extra = {"testcase": {"n_models": len(manifest.models), "prompt_types": ptypes}}
    return ImageSource(
        "abc_json",
        str(json_file),
        ids,
        shown,
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
    skipped: list[tuple[str, str]] = []
    for tar_path in tar_files(spec):
        samples: dict[str, dict[str, tarfile.TarInfo]] = {}
        shown_tar = display_name(tar_path)
        try:
            with tarfile.open(tar_path, "r:") as tf:
                captions: dict[str, str] = {}
                for info in tf:
                    if info.isdir():
                        continue
                    where = f"{shown_tar}/{display_name(info.name)}"
                    base = info.name.rsplit("/", 1)[-1]
                    if not info.isfile():
                        skipped.append((where, "not a regular file (a tar link or device)"))
                        continue
                    if base.startswith("."):
                        skipped.append((where, SKIP_HIDDEN))
                        continue
                    if "." not in base:
                        skipped.append((where, "no extension (not a webdataset member)"))
                        continue
                    key, ext = base.split(".", 1)
                    samples.setdefault(key, {})[ext.lower()] = info
                    if ext.lower() in _CAPTION_EXTS:
                        member = tf.extractfile(info)
                        assert member is not None  # a regular file (isfile above) always has data
                        data = member.read(_MAX_CAPTION_BYTES)
                        captions[key] = data.decode("utf-8", errors="replace").strip()
        except tarfile.ReadError as e:
            raise GenattrError(
                f"{tar_path}: not a readable uncompressed tar ({e}); webdataset shards are "
                "plain .tar files"
            ) from None
        for key, members in samples.items():
            image = next((m for ext, m in members.items() if _is_image_name("." + ext)), None)
            i = len(ids)
            ids.append(display_name(key))
            files.append(tar_path)
            if image is None:
                exts = display_name(", ".join(sorted(members)))
                prefailed[i] = f"no image member in this webdataset sample (has {exts})"
                name, off, size = next(iter(members.values())).name, 0, 0
            else:
                name, off, size = image.name, image.offset_data, image.size
            name = display_name(name)
            paths.append(f"{shown_tar}/{name}")
            offsets.append(off)
            sizes.append(size)
            for k, v in zip(cols, (shown_tar, name, ids[-1], captions.get(key)), strict=True):
                cols[k].append(v)
    src = ImageSource("tar", spec, ids, paths, files, offsets, sizes, cols, prefailed)
    src.skipped = skipped
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
        skipped=source.skipped,
        folders=source.folders,
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


def folder_images(folder: str | os.PathLike) -> ImageSource:
    """A folder's images as every command lists them (`folder_source`: recursive, recognised
    by content, hidden entries skipped, sorted by id), for commands that need every one of
    them (training sets, galleries scored by the model): an entry that cannot be an image, or
    an empty folder, is an error naming it."""
    if not os.path.isdir(folder):
        raise GenattrError(f"{display_name(str(folder))}: no such folder")
    src = folder_source(folder)
    if src.prefailed:
        i, reason = next(iter(sorted(src.prefailed.items())))
        raise GenattrError(f"{src.paths[i]}: {reason}")
    if not len(src):
        raise GenattrError(f"{display_name(str(folder))}: folder has no images")
    return src
