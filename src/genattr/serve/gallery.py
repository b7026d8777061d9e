"""The gallery of an index as the service shows it: id -> row, caption, thumbnail.

Thumbnails are found through the index's own metadata (the path recorded for each row), never
through anything a client sends. A recorded path is either a file on disk or, for the
miniature world, whose images live in arrays inside the package, a reference of the form
`genattr-world:clipart32/<row>` (see `world_path`), resolved to that row of the shipped data.
Paths that point into webdataset shards (`shard.tar/member`) have no thumbnail.
"""

from __future__ import annotations

import functools
import io
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from PIL import Image

from genattr.data.images import DEFAULT_MAX_PIXELS, ImageDecodeError, load_rgb
from genattr.world.clipart import load_data

if TYPE_CHECKING:
    from genattr.world.clipart import ClipartData

WORLD_SCHEME = "genattr-world:"
WORLD_PATH = re.compile(r"^genattr-world:clipart(?P<size>\d+)/(?P<row>\d+)$")
THUMBNAIL_SIDE = 256  # disk images are shrunk to fit this square; world images are smaller
THUMBNAIL_CACHE = 2048  # encoded thumbnails kept in memory (a few KB each)


def world_path(row: int, size: int = 32) -> str:
    """How an index records row `row` of the shipped world data (`load_data(size=size)`)."""
    return f"{WORLD_SCHEME}clipart{size}/{row}"


@dataclass(frozen=True)
class Thumbnail:
    data: bytes
    media_type: str


def _encode(image, fmt: str) -> Thumbnail:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **({"quality": 85} if fmt == "JPEG" else {}))
    return Thumbnail(buf.getvalue(), f"image/{fmt.lower()}")


class Gallery:
    """Gallery rows of one index: ids and recorded paths, with captions and thumbnails
    (read from `files`, the paths to open, where names are not UTF-8; default `paths`)."""

    def __init__(
        self,
        ids: list[str],
        paths: list[str],
        max_pixels: int | None = None,
        files: list[str] | None = None,
    ) -> None:
        self.ids, self.paths = ids, paths
        self.files = paths if files is None else files
        self.max_pixels = DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels
        self._rows = {id_: row for row, id_ in enumerate(ids)}
        self._world: dict[int, ClipartData] = {}  # shipped world data by image size
        self.thumbnail = functools.lru_cache(maxsize=THUMBNAIL_CACHE)(self._thumbnail)

    def __len__(self) -> int:
        return len(self.ids)

    def row(self, id_: str) -> int | None:
        """The row of a gallery id, or None: the only way a request reaches a gallery image."""
        return self._rows.get(id_)

    def _world_data(self, size: int) -> ClipartData:
        """The shipped world data at `size` px, loaded on first use and kept."""
        if size not in self._world:
            self._world[size] = load_data(size=size)
        return self._world[size]

    def _world_row(self, row: int) -> tuple[ClipartData, int] | None:
        m = WORLD_PATH.match(self.paths[row])
        if m is None:
            return None
        data = self._world_data(int(m["size"]))
        i = int(m["row"])
        return (data, i) if i < len(data.records) else None

    def caption(self, row: int) -> str | None:
        """The world's caption of a world image; None for other galleries (their path shows)."""
        if not self.paths[row].startswith(WORLD_SCHEME):
            return None
        found = self._world_row(row)
        return None if found is None else found[0].records[found[1]]["caption"]

    def _thumbnail(self, row: int) -> Thumbnail | None:
        """PNG of a world image at its own size, or a JPEG of a file on disk shrunk to fit
        THUMBNAIL_SIDE; None when the recorded path cannot be read as an image."""
        path = self.paths[row]
        if path.startswith(WORLD_SCHEME):
            found = self._world_row(row)
            if found is None:
                return None
            data, i = found
            return _encode(Image.fromarray(data.images[i]), "PNG")

        try:
            # a huge file is shrunk as it is decoded, not held whole to be thumbnailed
            image = load_rgb(self.files[row], self.max_pixels, max_work_side=4 * THUMBNAIL_SIDE)
        except ImageDecodeError:
            return None
        image.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
        return _encode(image, "JPEG")
