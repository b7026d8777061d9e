"""The web service through its HTTP API (FastAPI's TestClient) on a tiny world index: answers,
thumbnails by id only, and every kind of bad input refused with a 4xx JSON error while the
service stays up."""

from __future__ import annotations

import asyncio
import io
import re
import socket
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from typer.testing import CliRunner

from genattr.cli import app as cli_app
from genattr.serve.app import Limits, create_app
from genattr.serve.batcher import MicroBatcher
from genattr.serve.gallery import Gallery, world_path
from genattr.serve.world_index import default_world_index
from tests.conftest import SERVE_GALLERY as N_GALLERY
from tests.support import drawing, png_header

pytestmark = pytest.mark.usefixtures("one_torch_thread")
MAX_UPLOAD = 200_000


@pytest.fixture(scope="module")
def client(tiny_index):
    index, cal, _ = tiny_index
    limits = Limits(max_upload_bytes=MAX_UPLOAD)
    with TestClient(create_app(index, cal, limits=limits), raise_server_exceptions=False) as c:
        yield c


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def world_png(world_data, row: int, side: int = 32) -> bytes:
    return png(
        Image.fromarray(world_data.images[row]).resize((side, side), Image.Resampling.NEAREST)
    )


def post(client, data: bytes, name: str = "q.png", **params):
    return client.post("/attribute", files={"image": (name, data, "image/png")}, data=params)


def test_ranked_results_with_influence_summing_to_100(client, world_data, tiny_index):
    _, _, rows = tiny_index
    row = int(rows[7])
    r = post(client, world_png(world_data, row, 64), top_k=5)
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["width"], body["height"], body["top_k"]) == (64, 64, 5)
    results = body["results"]
    assert [x["rank"] for x in results] == [1, 2, 3, 4, 5]
    assert results[0]["id"] == world_data.records[row]["source"]
    assert results[0]["caption"] == world_data.records[row]["caption"]
    assert results[0]["path"] == world_path(row)
    sims = [x["similarity"] for x in results]
    assert sims == sorted(sims, reverse=True) and sims[0] > 0.99
    total = sum(x["influence"] for x in results) + body["remaining"]
    assert total == pytest.approx(100.0, abs=1e-6)
    assert body["calibrated"] and not body["estimated"]
    # the thumbnail side follows influence (sqrt rule), never smaller for a larger share
    sides = [x["display_side"] for x in results]
    assert sides == sorted(sides, reverse=True)


def test_top_k_as_query_parameter_and_default(client, world_data, tiny_index):
    _, _, rows = tiny_index
    r = client.post(
        "/attribute?top_k=3", files={"image": ("q.png", world_png(world_data, int(rows[0])))}
    )
    assert r.status_code == 200 and len(r.json()["results"]) == 3
    r = post(client, world_png(world_data, int(rows[0])))
    assert r.status_code == 200 and len(r.json()["results"]) == 20


def test_thumbnails_by_id_only(client, world_data, tiny_index):
    _, _, rows = tiny_index
    body = post(client, world_png(world_data, int(rows[3])), top_k=2).json()
    r = client.get(body["results"][0]["thumbnail"])
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    thumb = np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB"))
    np.testing.assert_array_equal(thumb, world_data.images[int(rows[3])])
    for bad in (
        "/images/..%2F..%2Fetc%2Fpasswd",
        "/images/../../etc/passwd",
        "/images//etc/passwd",
        "/images/" + world_path(int(rows[3])),  # a recorded path is not an id
        "/images/no-such-id.png",
    ):
        r = client.get(bad)
        assert r.status_code in (404, 422), bad
        assert "detail" in r.json()
        assert "root:" not in r.text


def test_health_page_and_schema(client):
    h = client.get("/healthz").json()
    assert h["status"] == "ok" and h["images"] == N_GALLERY and h["backbone"] == "pixel"
    page = client.get("/")
    assert page.status_code == 200 and "/page.js" in page.text and "{{" not in page.text
    assert client.get("/page.js").status_code == 200
    schema = client.get("/openapi.json").json()
    assert {"/attribute", "/images/{image_id}", "/healthz"} <= set(schema["paths"])


def _chunked(data: bytes):
    for i in range(0, len(data), 16384):
        yield data[i : i + 16384]


BOUNDARY = "genattr-test-boundary"


def _multipart(payload: bytes) -> bytes:
    return (
        (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="image"; filename="big.png"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        + payload
        + f"\r\n--{BOUNDARY}--\r\n".encode()
    )


BAD_UPLOADS = {
    "not an image": (b"hello, I am text", 422, "not an image"),
    "empty file": (b"", 422, "empty"),
    "1x1 pixels": (png(Image.new("RGB", (1, 1))), 422, "too small"),
    "20000x20000 pixels": (png_header(20000, 20000), 422, "pixels"),
    "too large a side": (png_header(17000, 100), 422, "too large"),
    "decompression bomb": (png_header(10000, 10000), 422, "decompression bomb"),
}


@pytest.mark.parametrize("kind", BAD_UPLOADS)
def test_bad_uploads_refused_and_service_stays_up(client, kind):
    data, status, words = BAD_UPLOADS[kind]
    r = post(client, data)
    assert r.status_code == status, r.text
    assert words in r.json()["detail"]
    assert client.get("/healthz").status_code == 200


def test_truncated_and_oversized_uploads(client, world_data, tiny_index):
    rng = np.random.default_rng(0)
    noise = png(Image.fromarray(rng.integers(0, 255, (128, 128, 3), dtype=np.uint8)))
    r = post(client, noise[: len(noise) // 2])
    assert r.status_code == 422 and "truncated" in r.json()["detail"]
    big = png(Image.fromarray(rng.integers(0, 255, (300, 300, 3), dtype=np.uint8)))
    assert len(big) > MAX_UPLOAD
    r = post(client, big)  # announces its length: refused before the body is read
    assert r.status_code == 413 and "limit" in r.json()["detail"]
    r = client.post(  # streams it (no Content-Length): refused as the count passes the limit
        "/attribute",
        content=_chunked(_multipart(big + bytes(200_000))),
        headers={"content-type": f"multipart/form-data; boundary={BOUNDARY}"},
    )
    assert r.status_code == 413 and "limit" in r.json()["detail"]
    assert client.get("/healthz").status_code == 200
    assert post(client, world_png(world_data, int(tiny_index[2][0])), top_k=1).status_code == 200


@pytest.mark.parametrize("top_k", ["0", "-3", str(N_GALLERY + 1), "1000000000000", "abc", "2.5"])
def test_top_k_out_of_range(client, world_data, tiny_index, top_k):
    r = post(client, world_png(world_data, int(tiny_index[2][0])), top_k=top_k)
    assert r.status_code == 422 and r.json()["detail"]
    assert client.get("/healthz").status_code == 200


def test_two_image_fields_are_refused(client, world_data, tiny_index):
    one = world_png(world_data, int(tiny_index[2][0]))
    files = [("image", ("a.png", one)), ("image", ("b.png", one))]
    r = client.post("/attribute", files=files)
    assert r.status_code == 422 and "2 'image' fields" in r.json()["detail"]
    assert client.post("/attribute", files=files[:1]).status_code == 200


def test_malformed_requests(client):
    assert client.post("/attribute").status_code == 422  # no image at all
    r = client.post("/attribute", json={"image": "x"})
    assert r.status_code == 422 and r.json()["detail"]
    r = client.post(
        "/attribute",
        content=b"--x\r\nbroken",
        headers={"content-type": "multipart/form-data; boundary=x"},
    )
    assert 400 <= r.status_code < 500
    assert client.get("/healthz").status_code == 200


def test_disk_gallery_thumbnails(tmp_path):
    """Indexes of files on disk: thumbnails come from the recorded paths, shrunk; files that
    went missing, tar members and empty paths are a 404, not an error."""
    paths = []
    for i, size in enumerate((64, 600)):
        p = tmp_path / f"img_{i}.png"
        drawing(i, size).save(p)
        paths.append(str(p))
    gallery = Gallery(
        ["a", "b", "c", "d", "e"], [*paths, str(tmp_path / "gone.png"), "s.tar/k.jpg", ""]
    )
    small = Image.open(io.BytesIO(gallery.thumbnail(0).data))
    assert small.size == (64, 64) and gallery.thumbnail(0).media_type == "image/jpeg"
    assert max(Image.open(io.BytesIO(gallery.thumbnail(1).data)).size) == 256
    assert [gallery.thumbnail(r) for r in (2, 3, 4)] == [None, None, None]
    assert gallery.caption(0) is None and gallery.row("c") == 2 and gallery.row("z") is None


def test_batcher_batches_and_keeps_the_loop_free():
    sizes = []

    def slow(items):
        sizes.append(len(items))
        time.sleep(0.2)
        return [ValueError("odd") if x % 2 else x * 10 for x in items]

    async def main():
        batcher = MicroBatcher(slow, max_batch=8, max_wait=0.05)
        await batcher.start()
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        t = asyncio.create_task(ticker())
        results = await asyncio.gather(
            *(batcher.submit(i) for i in range(8)), return_exceptions=True
        )
        t.cancel()
        await batcher.stop()
        return results, ticks

    results, ticks = asyncio.run(main())
    assert sizes == [8]
    assert results[0::2] == [0, 20, 40, 60] and all(
        isinstance(e, ValueError) for e in results[1::2]
    )
    assert ticks >= 10  # the loop ran while the batch computed in its thread


def test_default_world_index_is_built_once(tmp_path, monkeypatch):
    import genattr.serve.world_index as wi

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(wi, "build_world_index", interrupted)
    with pytest.raises(KeyboardInterrupt):
        default_world_index("pixel", cache_dir=tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []  # nothing that looks finished, no leftovers
    monkeypatch.undo()
    first = default_world_index("pixel", cache_dir=tmp_path, progress=False)
    stamp = (first / "index.json").stat().st_mtime_ns
    assert default_world_index("pixel", cache_dir=tmp_path, progress=False) == first
    assert (first / "index.json").stat().st_mtime_ns == stamp
    monkeypatch.setenv("GENATTR_CACHE", str(tmp_path))
    assert wi.world_cache_dir() == tmp_path / "world-index"


def test_cli_serve_refuses_a_bad_index_in_one_line(tmp_path):
    with socket.socket() as s:  # a free port: the address is checked first
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    res = CliRunner().invoke(cli_app, ["serve", "--index", str(tmp_path), "--port", port])
    assert res.exit_code == 2 and "not a genattr index" in res.output


def test_world_row_of_recorded_paths():
    from genattr.serve.examples import world_row

    assert world_row(world_path(5)) == 5
    assert world_row("/home/u/demo-out/world/exemplars/object-001/00123.png") == 123
    assert world_row("demo-out/world/pretrain/00007.png") == 7
    assert world_row("/photos/00012.png") is None  # a number, but not the world's
    assert world_row("demo-out/world/pretrain/cat.png") is None


def test_about_and_example_queries(tmp_path, world_data):
    """The page's header and one-click examples: what is served, and test samples of the
    world's benchmark whose true exemplars are in the gallery, served by id."""
    from genattr.calibrate import Calibrator, save_calibrator
    from genattr.serve.world_index import build_world_index, gallery_rows
    from genattr.world.benchmark import load_benchmark

    test_models = [m for m in load_benchmark().models if m["split"] == "test"]
    exemplars = sorted({e for m in test_models for e in m["exemplars"]})
    rows = np.union1d(gallery_rows(world_data)[:40], exemplars)
    build_world_index(tmp_path / "index", "pixel", rows=rows, data=world_data)
    save_calibrator(Calibrator(inv_tau=60.0, bias=-50.0), tmp_path / "cal.json")
    with TestClient(create_app(tmp_path / "index", tmp_path / "cal.json")) as c:
        about = c.get("/about").json()
        assert about["images"] == len(rows) and about["backbone"] == "pixel"
        assert about["head"] is None and about["calibrator"] == {"inv_tau": 60.0, "bias": -50.0}
        examples = about["examples"]
        assert 1 <= len(examples) <= 6
        # Taken in turn from the test cases the benchmark has.
        cases = {m.get("case", m["mode"]) for m in test_models}
        assert {re.match(r"\S+ \((\w+)", e["label"])[1] for e in examples} == cases
        for e in examples:
            assert e["exemplar_ids"]
            for id_ in e["exemplar_ids"]:
                assert c.get("/images/" + id_).status_code == 200
        png_bytes = c.get(examples[0]["image"]).content
        assert Image.open(io.BytesIO(png_bytes)).size == (32, 32)
        answer = post(c, png_bytes, top_k=10)
        assert answer.status_code == 200 and len(answer.json()["results"]) == 10
        assert c.get(f"/examples/{len(examples)}").status_code == 404
        page = c.get("/").text
        assert 'id="served"' in page and 'id="examples"' in page
