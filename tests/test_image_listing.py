"""One folder, one list of images: extraction, customization and the model-based methods list
a folder the same way (same images, same ids) and read them with the same guards."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from genattr.customize.examples import check_image, list_images, open_training_image, read_square
from genattr.errors import GenattrError
from genattr.features.extract import extract
from genattr.workflows.model_cases import FolderImages
from tests.support import png_header


def _image(path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(path, "PNG")


@pytest.fixture
def folder(tmp_path) -> Path:
    """Images a suffix list misses (upper case, none, in a subfolder) beside what is not an
    image (a hidden file, notes)."""
    root = tmp_path / "gallery"
    _image(root / "a.png", 0)
    _image(root / "B.PNG", 1)
    _image(root / "sub" / "c.png", 2)
    _image(root / "no_suffix", 3)
    _image(root / ".hidden.png", 4)
    (root / "notes.txt").write_text("not an image")
    return root


def test_every_command_lists_a_folder_alike(folder, tmp_path):
    store = extract("pixel", folder, tmp_path / "store", workers=0).store
    gallery = FolderImages(folder, ["a caption"], 16)
    exemplars = list_images([folder])
    assert store.ids == gallery.ids == ["B.PNG", "a.png", "no_suffix", "sub/c.png"]
    assert [str(p) for p in gallery.paths] == [str(p) for p in exemplars] == store.file_paths
    assert gallery.block(0, 4)[0].shape == (4, 16, 16, 3)


def test_model_path_reads_with_extractions_guards(folder, tmp_path):
    bomb = folder / "bomb.png"
    bomb.write_bytes(png_header(20000, 20000))  # 400 M pixels claimed in a few bytes
    r = extract("pixel", folder, tmp_path / "store", workers=0)
    assert r.failed_total == 1  # extraction records it
    for read in (open_training_image, check_image, lambda p: read_square(p, 16)):
        with pytest.raises(GenattrError, match="decompression bomb"):
            read(bomb)
    gallery = FolderImages(folder, ["a caption"], 16)
    with pytest.raises(GenattrError, match="decompression bomb"):
        gallery.block(0, len(gallery))
    (folder / "empty.png").write_bytes(b"")
    with pytest.raises(GenattrError, match="empty"):
        check_image(folder / "empty.png")


def test_a_folder_without_images_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(GenattrError, match="no images"):
        FolderImages(tmp_path / "empty", ["x"], 16)
    with pytest.raises(GenattrError, match="no such folder"):
        FolderImages(tmp_path / "nope", ["x"], 16)
