"""Extraction over a hostile folder: every entry stored, failed or skipped, and the run ends.

The folder holds what a real collection can hold: a FIFO and a socket named like images, a file
above the byte limit, a name that is not UTF-8, JPEGs spelled .jfif/.jpe, an icon, images
without (or with a wrong) extension, symlinked folders (one a loop), broken symlinks, hidden
entries, empty files and folders, text named .png. Runs that could hang (a FIFO opened for
reading blocks until a writer comes) run in a subprocess with a timeout.
"""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from genattr.data.files import sniff_image
from genattr.data.sources import (
    SKIP_HIDDEN,
    SKIP_NOT_IMAGE,
    SKIP_WALKED,
    ImageSource,
    display_name,
    open_source,
)
from genattr.errors import GenattrError
from genattr.features import decode as decode_module
from genattr.features import get_backbone
from genattr.features.extract import extract
from genattr.store import EmbeddingStore

pytestmark = [
    pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs and symlinks"),
    pytest.mark.slow,  # extraction in subprocesses: seconds each
]

SCRIPT = """
import json, sys
from genattr.features.extract import extract
r = extract("pixel", sys.argv[1], sys.argv[2], workers=1, batch_size=4, shard_size=5,
            max_file_mb=float(sys.argv[3]))
print(json.dumps({"listing": r.listing, "count": r.store.count, "failed": r.failed_total,
                  "total": r.total}))
"""
LIMIT_MB = 0.05  # 52,428 bytes: the oversized file is above, every other image far below
TIMEOUT_S = 120  # the run takes a few seconds; a hang fails the test instead of blocking CI


def _encoded(seed: int, fmt: str, size=(32, 32)) -> bytes:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def _pixel_vec(data: bytes) -> np.ndarray:
    return get_backbone("pixel").preprocess(Image.open(io.BytesIO(data)).convert("RGB")).reshape(-1)


def _hostile(root: Path, outside: Path) -> tuple[dict[str, tuple[str, str]], dict[str, bytes]]:
    """Make the folder; return {id or relative path: (outcome, reason fragment)} for every
    entry, and the bytes of every image expected in the store."""
    expected: dict[str, tuple[str, str]] = {}
    images: dict[str, bytes] = {}
    root.mkdir()
    outside.mkdir()

    def image(rel: str, data: bytes) -> None:
        (root / rel).write_bytes(data)
        expected[rel], images[rel] = ("stored", ""), data

    def entry(rel: str, outcome: str, reason: str) -> None:
        expected[rel] = (outcome, reason)

    image("a.png", _encoded(0, "PNG"))
    image("b.jpg", _encoded(1, "JPEG"))
    image("photo.jfif", _encoded(2, "JPEG"))
    image("photo2.JPE", _encoded(3, "JPEG"))
    image("icon.ico", _encoded(4, "ICO"))
    image("noext", _encoded(5, "PNG"))  # no extension: an image by its first bytes
    image("looks.txt", _encoded(6, "GIF"))  # a wrong extension: likewise
    image("scan.dat", _encoded(7, "TIFF"))
    image("pic.bin", _encoded(8, "WEBP"))
    image("bitmap", _encoded(9, "BMP"))
    # a name that is not UTF-8: stored under a printable id, read through its real name
    cafe = _encoded(10, "PNG")
    fd = os.open(os.fsencode(root) + b"/caf\xe9.png", os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, cafe)
    os.close(fd)
    expected["caf\\xe9.png"], images["caf\\xe9.png"] = ("stored", ""), cafe

    os.mkfifo(root / "x.png")
    entry("x.png", "failed", "not a regular file (FIFO)")
    os.mkfifo(root / "fifo")
    entry("fifo", "skipped", "not a regular file (FIFO)")
    cwd = os.getcwd()
    os.chdir(root)  # AF_UNIX paths are short: bind by relative name
    try:
        socks = [socket.socket(socket.AF_UNIX), socket.socket(socket.AF_UNIX)]
        socks[0].bind("sock.png")
        socks[1].bind("sock")
    finally:
        os.chdir(cwd)
    for s in socks:
        s.close()  # the socket file stays
    entry("sock.png", "failed", "not a regular file (socket)")
    entry("sock", "skipped", "not a regular file (socket)")

    big = _encoded(11, "PNG", (200, 200))  # ~120 KB of noise
    assert len(big) > LIMIT_MB * 2**20 * 2
    (root / "big.png").write_bytes(big)
    entry("big.png", "failed", f"larger than {LIMIT_MB:g} MB ({len(big)} bytes)")
    (root / "text.png").write_text("hello, not a picture\n")
    entry("text.png", "failed", "not an image (format not recognised)")
    (root / "zero.png").write_bytes(b"")
    entry("zero.png", "failed", "empty file")
    (root / "zero").write_bytes(b"")
    entry("zero", "skipped", SKIP_NOT_IMAGE)
    (root / "notes.txt").write_text("a caption")
    entry("notes.txt", "skipped", SKIP_NOT_IMAGE)
    (root / "BMW.txt").write_text("BM but no bitmap header follows")
    entry("BMW.txt", "skipped", SKIP_NOT_IMAGE)

    (root / ".hidden.png").write_bytes(_encoded(12, "PNG"))
    entry(".hidden.png", "skipped", SKIP_HIDDEN)
    (root / ".cache").mkdir()
    (root / ".cache" / "c.png").write_bytes(_encoded(13, "PNG"))
    entry(".cache", "skipped", SKIP_HIDDEN)  # one entry: its content is not seen

    (root / "d.png").mkdir()  # a folder named like an image is walked as a folder
    entry("d.png", "folder", "")
    image("d.png/inner.png", _encoded(14, "PNG"))
    (root / "empty_dir").mkdir()
    entry("empty_dir", "folder", "")

    (root / "broken.png").symlink_to(root / "missing.png")
    entry("broken.png", "failed", "broken symlink")
    (root / "broken").symlink_to(root / "missing")
    entry("broken", "skipped", "broken symlink")
    (root / "link.png").symlink_to(root / "a.png")  # a symlink to a file is that file
    expected["link.png"], images["link.png"] = ("stored", ""), images["a.png"]

    (outside / "l1.png").write_bytes(_encoded(15, "PNG"))
    (outside / "l2.jpg").write_bytes(_encoded(16, "JPEG"))
    (root / "linked").symlink_to(outside, target_is_directory=True)
    entry("linked", "folder", "")
    expected["linked/l1.png"], images["linked/l1.png"] = ("stored", ""), _encoded(15, "PNG")
    expected["linked/l2.jpg"], images["linked/l2.jpg"] = ("stored", ""), _encoded(16, "JPEG")

    (root / "sub").mkdir()
    entry("sub", "folder", "")
    image("sub/s.png", _encoded(17, "PNG"))
    (root / "sub" / "up").symlink_to(root, target_is_directory=True)  # a loop
    entry("sub/up", "skipped", SKIP_WALKED)
    (root / "again").symlink_to(root / "sub", target_is_directory=True)  # a second link
    entry("again", "skipped", SKIP_WALKED)

    # two names that print the same: the second is a failure, not a silent overwrite
    (root / "clash").mkdir()
    entry("clash", "folder", "")
    image("clash/caf\\xe9.png", _encoded(18, "PNG"))
    fd = os.open(os.fsencode(root) + b"/clash/caf\xe9.png", os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, _encoded(19, "PNG"))
    os.close(fd)
    expected["clash/caf\\xe9.png#2"] = ("failed", "duplicate id 'clash/caf\\\\xe9.png'")

    # the table names every entry made (listed independently of genattr's walk)
    made = sum(len(os.listdir(d)) for d in (root, outside, *(root / n for n in ("d.png", "sub"))))
    made += len(os.listdir(root / "clash")) + len(os.listdir(root / "empty_dir"))
    assert made == len(expected), (made, len(expected))
    return expected, images


def _run(images: Path | str, out: Path, limit_mb: float = LIMIT_MB) -> dict:
    try:
        done = subprocess.run(
            [sys.executable, "-c", SCRIPT, str(images), str(out), str(limit_mb)],
            capture_output=True,
            timeout=TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"extraction did not finish in {TIMEOUT_S} s (a FIFO opened for reading?)")
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    return json.loads(done.stdout.decode().strip().splitlines()[-1])


def test_every_entry_of_a_hostile_folder_is_accounted_for_once(tmp_path):
    root, out = tmp_path / "hostile", tmp_path / "out"
    expected, images = _hostile(root, tmp_path / "outside")
    summary = _run(root, out)

    store = EmbeddingStore.open(out)
    failed = pq.read_table(out / "failed.parquet").to_pylist()
    skipped = pq.read_table(out / "skipped.parquet").to_pylist()
    prefix = str(root) + "/"
    assert all(r["path"].startswith(prefix) for r in skipped)
    got: dict[str, tuple[str, str]] = {i: ("stored", "") for i in store.ids}
    for r in failed:
        key = r["id"] if r["id"] not in got else r["id"] + "#2"
        got[key] = ("failed", r["reason"])
    for r in skipped:
        got[r["path"][len(prefix) :]] = ("skipped", r["reason"])
    listing = store.extra["extraction"]["listing"]
    got.update({k: ("folder", "") for k, v in expected.items() if v[0] == "folder"})
    assert listing["folders"] == sum(v[0] == "folder" for v in expected.values()) == 5

    # exactly once: the stored, failed and skipped rows and the folders add up to the entries
    n_rows = store.count + len(failed) + len(skipped) + listing["folders"]
    assert n_rows == len(got) == len(expected)
    assert set(got) == set(expected)
    for key, (outcome, fragment) in expected.items():
        assert got[key][0] == outcome, (key, got[key])
        assert fragment in got[key][1], (key, got[key])

    # the summary says the same
    assert summary["count"] == store.count == len(images)
    assert summary["failed"] == len(failed) == 7
    assert listing["items"] == summary["total"] == store.count + len(failed)
    assert listing == summary["listing"]
    assert sum(listing["skipped"].values()) == len(skipped) == 10
    assert listing["skipped"][SKIP_HIDDEN] == 2 and listing["skipped"][SKIP_WALKED] == 2
    assert store.extra["extraction"]["complete"] and store.extra["extraction"]["max_file_mb"] == (
        LIMIT_MB
    )

    # stored images are the right pixels, read through their real (non-UTF-8) names
    for row, id_ in enumerate(store.ids):
        np.testing.assert_allclose(store.vectors[row], _pixel_vec(images[id_]), atol=1e-6)
    meta = {r["id"]: r["path"] for r in store.metadata(["id", "path"]).to_pylist()}
    assert meta["caf\\xe9.png"] == display_name(str(root / "caf\udce9.png"))
    assert meta["caf\\xe9.png"].endswith("/caf\\xe9.png")

    # a re-run finds the store complete: the failures are not retried forever
    again = _run(root, out)
    assert again["count"] == store.count and again["listing"] == listing


def test_a_list_file_with_a_fifo_an_oversized_file_and_odd_names(tmp_path):
    os.mkfifo(tmp_path / "pipe.png")
    (tmp_path / "ok.png").write_bytes(_encoded(0, "PNG"))
    (tmp_path / "big.png").write_bytes(_encoded(1, "PNG", (200, 200)))
    (tmp_path / "folder.png").mkdir()
    fd = os.open(os.fsencode(tmp_path) + b"/\xff.png", os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, _encoded(2, "PNG"))
    os.close(fd)
    lst = tmp_path / "list.txt"
    lst.write_bytes(b"pipe.png\nok.png\nbig.png\nfolder.png\n\xff.png\nnul\0.png\n")
    _run(lst, tmp_path / "out")
    store = EmbeddingStore.open(tmp_path / "out")
    assert store.ids == ["ok.png", "\\xff.png"]
    np.testing.assert_allclose(store.vectors[1], _pixel_vec(_encoded(2, "PNG")), atol=1e-6)
    failed = {
        r["id"]: r["reason"] for r in pq.read_table(tmp_path / "out" / "failed.parquet").to_pylist()
    }
    assert failed["pipe.png"] == "not a regular file (FIFO)"
    assert failed["big.png"].startswith("larger than 0.05 MB")
    assert failed["folder.png"] == "not a regular file (folder)"
    assert failed["nul\0.png"].startswith("cannot read") and len(failed) == 4


def test_a_tar_with_an_oversized_member_and_members_that_are_not_samples(tmp_path):
    def add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))

    big = _encoded(1, "PNG", (200, 200))
    with tarfile.open(tmp_path / "s.tar", "w", format=tarfile.PAX_FORMAT) as tf:
        add(tf, "0001.png", _encoded(0, "PNG"))
        add(tf, "0002.png", big)
        add(tf, ".DS_Store", b"x")
        add(tf, "README", b"x")
        add(tf, "caf\udce9.png", _encoded(2, "PNG"))  # a member name that is not UTF-8
        link = tarfile.TarInfo("0003.png")
        link.type = tarfile.SYMTYPE
        link.linkname = "0001.png"
        tf.addfile(link)
    r = extract("pixel", str(tmp_path / "s.tar"), tmp_path / "out", workers=0, max_file_mb=0.05)
    assert r.store.ids == ["0001", "caf\\xe9"]
    failed = {
        x["id"]: x["reason"] for x in pq.read_table(tmp_path / "out" / "failed.parquet").to_pylist()
    }
    assert list(failed) == ["0002"] and failed["0002"].startswith("larger than 0.05 MB")
    skipped = pq.read_table(tmp_path / "out" / "skipped.parquet").to_pylist()
    assert [Path(x["path"]).name for x in skipped] == [".DS_Store", "README", "0003.png"]
    assert r.skipped == {
        SKIP_HIDDEN: 1,
        "no extension (not a webdataset member)": 1,
        "not a regular file (a tar link or device)": 1,
    }


def test_running_out_of_memory_on_one_image_is_that_images_failure(tmp_path, monkeypatch):
    src = tmp_path / "imgs"
    src.mkdir()
    for k in range(4):
        (src / f"{k}.png").write_bytes(_encoded(k, "PNG"))
    real = decode_module.load_rgb

    def load_rgb(data, max_pixels):
        if data == _encoded(1, "PNG"):
            raise MemoryError
        return real(data, max_pixels)

    monkeypatch.setattr(decode_module, "load_rgb", load_rgb)
    read = ImageSource.read_bytes

    def read_bytes(self, i, max_bytes=None):
        if self.ids[i] == "3.png":
            raise MemoryError
        return read(self, i, max_bytes)

    monkeypatch.setattr(ImageSource, "read_bytes", read_bytes)
    r = extract("pixel", src, tmp_path / "out", workers=0)
    assert r.store.ids == ["0.png", "2.png"]
    failed = {
        x["id"]: x["reason"] for x in pq.read_table(tmp_path / "out" / "failed.parquet").to_pylist()
    }
    assert failed == {
        "1.png": f"out of memory while decoding ({len(_encoded(1, 'PNG'))} bytes)",
        "3.png": "out of memory while reading the file",
    }
    assert extract("pixel", src, tmp_path / "out", workers=0).extracted == 0  # not retried


def test_the_byte_limit_is_checked_and_validated(tmp_path):
    src = tmp_path / "imgs"
    src.mkdir()
    data = _encoded(0, "PNG", (64, 64))
    (src / "a.png").write_bytes(data)
    limit = (len(data) - 1) / 2**20  # one byte short
    r = extract("pixel", src, tmp_path / "o1", workers=0, max_file_mb=limit)
    assert r.store.count == 0 and r.failed_total == 1
    r = extract("pixel", src, tmp_path / "o2", workers=0, max_file_mb=len(data) / 2**20)
    assert r.store.count == 1 and r.failed_total == 0  # exactly at the limit: read
    for bad in (0, -1, float("nan"), float("inf")):
        with pytest.raises(GenattrError, match="--max-file-mb"):
            extract("pixel", src, tmp_path / "o3", workers=0, max_file_mb=bad)
    assert not (tmp_path / "o3").exists()


def test_ordinary_folders_keep_their_ids_and_fingerprint(tmp_path):
    """A folder of ordinary names lists as before this change: stores made then still resume."""
    names = [
        "a.png", "B.JPG", "sub/c.jpeg", "sub/deeper/d.webp", "sub/e.tif", "f.tiff", "g.bmp",
        "h.gif", "i.ppm", "j.pgm", "notes.txt", "caption.json", ".hidden.png", ".git/x.png",
        "sub/.cache/y.png", "z z/\u00fc.png", "10.png", "9.png",
    ]  # fmt: skip
    for n in names:
        (tmp_path / n).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / n).write_bytes(b"x")
    src = open_source(tmp_path)
    assert src.ids == [
        "10.png", "9.png", "B.JPG", "a.png", "f.tiff", "g.bmp", "h.gif", "i.ppm", "j.pgm",
        "sub/c.jpeg", "sub/deeper/d.webp", "sub/e.tif", "z z/\u00fc.png",
    ]  # fmt: skip
    assert src.paths == src.files == [str(tmp_path / i) for i in src.ids]
    # computed with the listing before content sniffing and symlink following were added
    assert src.fingerprint() == "be89d1e8cdd61c0f9d24ff74cfe9043db14a9a5e7830925fff6c4f9ab7135581"
    assert src.listing() == {
        "items": 13,
        "folders": 3,
        "skipped": {SKIP_HIDDEN: 3, SKIP_NOT_IMAGE: 2},
    }


def test_sniffing_needs_the_whole_signature():
    assert sniff_image(_encoded(0, "PNG")[:8]) == "PNG"
    assert sniff_image(_encoded(0, "ICO")[:32]) == "ICO"
    assert sniff_image(_encoded(0, "BMP")[:32]) == "BMP"
    assert sniff_image(b"BM" + b"\0" * 30) is None  # "BM" and no DIB header size
    assert sniff_image(b"\0\0\1\0\0\0" + b"\0" * 26) is None  # an icon of no images
    assert sniff_image(b"RIFF\0\0\0\0WAVE") is None
    assert sniff_image(b"") is None


def test_cli_summary_counts_the_skipped(tmp_path):
    from typer.testing import CliRunner

    from genattr.cli import app

    src = tmp_path / "imgs"
    src.mkdir()
    (src / "a.png").write_bytes(_encoded(0, "PNG"))
    (src / "big.png").write_bytes(_encoded(1, "PNG", (200, 200)))
    (src / ".DS_Store").write_bytes(b"x")
    (src / "notes.txt").write_text("x")
    (src / "more.txt").write_text("x")
    out = tmp_path / "store"
    args = ["extract", "--features", "pixel", "--images", str(src), "--out", str(out)]
    res = CliRunner().invoke(
        app, [*args, "--workers", "0", "--no-progress", "--max-file-mb", "0.05"]
    )
    assert res.exit_code == 0, res.output
    assert "1 vectors" in res.output and "1 failed" in res.output
    assert "3 skipped (1 hidden, 2 not an image" in res.output and "images/s" in res.output
    again = CliRunner().invoke(
        app, [*args, "--workers", "0", "--no-progress", "--max-file-mb", "0.05"]
    )
    assert again.exit_code == 0 and "nothing new to extract" in again.output, again.output
    assert "nan" not in again.output


def test_names_that_are_not_utf8_reopen_from_the_store_and_the_index(tmp_path):
    """A name whose bytes are not UTF-8 is recorded printable (\\xNN) and kept as its bytes:
    the store, the index built from it and the service's thumbnails open the real file."""
    from genattr.search.index import AttributionIndex
    from genattr.serve.gallery import Gallery
    from genattr.workflows.index import build_index_from_store

    root = tmp_path / "imgs"
    root.mkdir()
    (root / "plain.png").write_bytes(_encoded(0, "PNG"))
    with open(os.fsencode(root) + b"/caf\xe9.png", "wb") as f:
        f.write(_encoded(1, "PNG"))
    for lst in (None, tmp_path / "list.txt"):
        if lst is not None:  # the same names through a list file (bytes as written)
            lst.write_bytes(b"imgs/caf\xe9.png\nimgs/plain.png\n")
        out = tmp_path / ("store" if lst is None else "store_list")
        _run(root if lst is None else lst, out)
        store = EmbeddingStore.open(out)
        assert [p.endswith("caf\\xe9.png") for p in store.paths] == [True, False]
        files = store.file_paths
        assert os.fsencode(files[0]).endswith(b"/caf\xe9.png") and os.path.isfile(files[0])
        assert files[1] == store.paths[1]  # ordinary names as recorded
        np.testing.assert_allclose(store.vectors[0], _pixel_vec(_encoded(1, "PNG")), atol=1e-6)
    build_index_from_store(tmp_path / "store", tmp_path / "index")
    index = AttributionIndex.load(tmp_path / "index")
    assert index.file_paths() == EmbeddingStore.open(tmp_path / "store").file_paths
    gallery = Gallery(*index.metadata(), files=index.file_paths())
    assert all(gallery.thumbnail(row) is not None for row in range(2))
