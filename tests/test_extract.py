"""Extraction into stores: every source kind, bad images, resume checks, the CLI."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from genattr.errors import GenattrError
from genattr.features import get_backbone
from genattr.features.extract import choose_workers, extract
from genattr.store import EmbeddingStore, convert


def _rand_image(seed: int, size=(32, 32)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _pixel_vec(image: Image.Image) -> np.ndarray:
    return get_backbone("pixel").preprocess(image.convert("RGB")).reshape(-1)


def _failed(store_dir) -> dict[str, str]:
    rows = pq.read_table(store_dir / "failed.parquet").to_pylist()
    return {r["id"]: r["reason"] for r in rows}


def test_folder_recursive_sorted(tmp_path):
    src = tmp_path / "imgs"
    (src / "b").mkdir(parents=True)
    (src / ".hidden").mkdir()
    names = ["z.png", "b/a.png", "a.jpg", "B.PNG"]
    for k, n in enumerate(names):
        _rand_image(k).save(src / n, quality=100) if n.endswith("jpg") else _rand_image(k).save(
            src / n
        )
    _rand_image(9).save(src / ".hidden" / "x.png")
    (src / "notes.txt").write_text("not listed: not an image extension")

    r = extract("pixel", src, tmp_path / "out", batch_size=3, workers=0)
    store = r.store
    assert store.ids == ["B.PNG", "a.jpg", "b/a.png", "z.png"]
    assert r.extracted == 4 and r.failed_total == 0 and r.total == 4
    assert r.skipped == {"hidden": 1, "not an image": 1}  # .hidden/ and notes.txt, counted
    listing = {"items": 4, "folders": 1, "skipped": r.skipped}
    assert r.listing == store.extra["extraction"]["listing"] == listing
    for row, id_ in enumerate(store.ids):
        expected = _pixel_vec(Image.open(src / id_))
        np.testing.assert_allclose(store.vectors[row], expected, rtol=0, atol=1e-6)
    assert store.backbone.name == "pixel" and store.extra["extraction"]["complete"]


def test_list_file_in_order_with_relative_paths_and_duplicates(tmp_path):
    (tmp_path / "d").mkdir()
    for k in range(3):
        _rand_image(k).save(tmp_path / "d" / f"{k}.png")
    lst = tmp_path / "list.txt"
    lst.write_text("# my images\nd/2.png\n\nd/0.png\nd/missing.png\nd/2.png\n")
    r = extract("pixel", lst, tmp_path / "out", workers=0)
    assert r.store.ids == ["d/2.png", "d/0.png"]
    np.testing.assert_allclose(
        r.store.vectors[0], _pixel_vec(Image.open(tmp_path / "d" / "2.png")), atol=1e-6
    )
    failed = pq.read_table(tmp_path / "out" / "failed.parquet").to_pylist()
    assert [(f["source_index"], f["path"]) for f in failed] == [
        (2, "d/missing.png"),
        (3, "d/2.png"),
    ]
    assert failed[0]["reason"].startswith("cannot read") and "duplicate id" in failed[1]["reason"]


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    _rand_image(seed).save(buf, format="PNG")
    return buf.getvalue()


def test_webdataset_tars(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    with tarfile.open(shards / "000.tar", "w") as tf:
        _add(tf, "part/0001.png", _png(1))
        _add(tf, "part/0001.txt", b"a red apple\n")
        _add(tf, "part/0002.json", b"{}")  # a sample without an image: recorded, not dropped
        _add(tf, "part/0003.png", _png(3))
    with tarfile.open(shards / "001.tar", "w") as tf:
        _add(tf, "0004.jpg", _png(4))  # wrong extension, still decodes
        _add(tf, "0004.cls", b"7")
        _add(tf, "0001.png", _png(5))  # key already used in 000.tar
    r = extract("pixel", str(shards / "{000..001}.tar"), tmp_path / "out", workers=1)
    store = r.store
    assert store.ids == ["0001", "0003", "0004"]
    meta = store.metadata().to_pylist()
    assert meta[0]["caption"] == "a red apple" and meta[1]["caption"] is None
    assert meta[0]["tar"].endswith("000.tar") and meta[2]["member"] == "0004.jpg"
    np.testing.assert_allclose(store.vectors[2], _pixel_vec(_rand_image(4)), atol=1e-6)
    failed = _failed(tmp_path / "out")
    assert "no image member" in failed["0002"] and "duplicate id" in failed["0001"]
    # a glob spells the same source: the finished store is recognised, nothing is redone
    again = extract("pixel", str(shards / "*.tar"), tmp_path / "out", workers=0)
    assert again.extracted == 0 and again.resumed_from == 5


def test_abc_json_test_case(tmp_path):
    for k in range(9):
        _rand_image(k).save(tmp_path / f"{k}.png")
    cases = [
        {
            "exemplar": ["0.png", "1.png"],
            "synth": {"object": ["2.png", "3.png"], "gpt": ["4.png"]},
            "class_id": "dog_0",
            "category": "dog",
        },
        {
            "exemplar": ["5.png"],
            "synth": {"object": ["6.png"], "gpt": ["7.png", "8.png"]},
            "class_id": "art_1",
            "category": None,
        },
    ]
    (tmp_path / "sub").mkdir()
    js = tmp_path / "sub" / "test_case.json"
    js.write_text(json.dumps(cases))
    r = extract("pixel", js, tmp_path / "out", root=tmp_path, workers=0, shard_size=4)
    meta = r.store.metadata().to_pylist()
    assert [m["role"] for m in meta] == ["exemplar"] * 3 + ["synth"] * 6
    assert meta[5] == {
        "id": "synth/object/2",
        "path": "6.png",
        "role": "synth",
        "model_index": 1,
        "class_id": "art_1",
        "category": None,
        "prompt_type": "object",
        "source_index": 5,
    }
    tc = convert.store_to_testcase(r.store)
    assert tc.exemplar_chunks == [(0, 2), (2, 3)] and tc.prompt_types == ["object", "gpt"]
    assert tc.synth_ids == {"object": [0, 0, 1], "gpt": [0, 1, 1]}
    assert tc.synth_paths["gpt"] == ["4.png", "7.png", "8.png"]
    np.testing.assert_allclose(
        tc.synth_feats["gpt"][2].numpy(), _pixel_vec(Image.open(tmp_path / "8.png")), atol=1e-6
    )


def _write_bad_images(d):
    d.mkdir()
    buf = io.BytesIO()
    _rand_image(1, (64, 64)).save(buf, format="PNG")
    (d / "truncated.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    buf = io.BytesIO()
    _rand_image(2, (64, 64)).save(buf, format="JPEG", quality=95)
    (d / "truncated.jpg").write_bytes(buf.getvalue()[: int(len(buf.getvalue()) * 0.6)])
    (d / "empty.png").write_bytes(b"")
    (d / "text.jpg").write_text("this is not a JPEG")
    Image.new("CMYK", (32, 32), (255, 0, 0, 0)).save(d / "cmyk.jpg", quality=100)
    pal = Image.new("P", (32, 32), 0)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.paste(1, (16, 0, 32, 32))  # right half red, left half index 0 = transparent
    pal.save(d / "palette.png", transparency=0)
    gray16 = np.zeros((32, 32), np.uint16)
    gray16[:, 8:16], gray16[:, 16:] = 128 * 257, 65535
    Image.fromarray(gray16).save(d / "gray16.png")
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[..., 2], rgba[..., 3] = 255, 0
    rgba[16:, :, 3] = 255
    Image.fromarray(rgba, "RGBA").save(d / "alpha.png")
    _rand_image(3, (200, 200)).save(d / "bomb.png")
    _rand_image(4).save(d / "fine.png")


def _assert_rgb(chw: np.ndarray, rgb) -> None:
    expected = np.broadcast_to(np.asarray(rgb, np.float32)[:, None, None], chw.shape)
    np.testing.assert_array_equal(chw, expected)


def test_bad_images_are_converted_or_recorded(tmp_path):
    _write_bad_images(tmp_path / "bad")
    modes = {n: Image.open(tmp_path / "bad" / n).mode for n in ("cmyk.jpg", "palette.png")}
    modes.update({n: Image.open(tmp_path / "bad" / n).mode for n in ("gray16.png", "alpha.png")})
    assert modes == {
        "cmyk.jpg": "CMYK",
        "palette.png": "P",
        "gray16.png": "I;16",
        "alpha.png": "RGBA",
    }
    r = extract("pixel", tmp_path / "bad", tmp_path / "out", max_pixels=100 * 100, workers=1)
    failed = _failed(tmp_path / "out")
    assert set(failed) == {"truncated.png", "truncated.jpg", "empty.png", "text.jpg", "bomb.png"}
    assert "truncated" in failed["truncated.png"] and "truncated" in failed["truncated.jpg"]
    assert failed["empty.png"] == "empty file" and failed["text.jpg"].startswith("not an image")
    assert failed["bomb.png"].startswith("decompression bomb")
    ids = r.store.ids
    assert ids == ["alpha.png", "cmyk.jpg", "fine.png", "gray16.png", "palette.png"]
    assert r.store.count + r.failed_total == r.total == 10

    def img(name):
        return r.store.vectors[ids.index(name)].reshape(3, 32, 32)

    pal = img("palette.png")
    np.testing.assert_array_equal(pal[:, :, :16], 1.0)  # transparent -> white
    _assert_rgb(pal[:, :, 16:], (1, 0, 0))
    g = img("gray16.png")[0]  # 16-bit scaled to 8 bits, not clipped at 255
    np.testing.assert_allclose(g[:, [0, 8, 16]], np.tile([0, 128 / 255, 1.0], (32, 1)), atol=1e-6)
    a = img("alpha.png")
    np.testing.assert_array_equal(a[:, :16], 1.0)  # fully transparent rows -> white
    _assert_rgb(a[:, 16:], (0, 0, 1))
    cmyk = img("cmyk.jpg")  # cyan ink -> no red, green and blue high
    assert cmyk[0].max() < 0.1 and cmyk[1].min() > 0.9 and cmyk[2].min() > 0.9


def test_workers_and_inline_decoding_agree(tmp_path):
    src = tmp_path / "imgs"
    src.mkdir()
    for k in range(13):
        _rand_image(k, (40 + k, 30)).save(src / f"{k:02d}.png")
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    a = extract("pixel", src, tmp_path / "a", workers=0, batch_size=4, shard_size=5)
    b = extract("pixel", src, tmp_path / "b", workers=2, batch_size=4, shard_size=5)
    assert a.store.ids == b.store.ids and a.store.num_shards == b.store.num_shards == 3
    np.testing.assert_array_equal(np.asarray(a.store.vectors), np.asarray(b.store.vectors))
    assert _failed(tmp_path / "a") == _failed(tmp_path / "b") and len(_failed(tmp_path / "a")) == 1


def test_chosen_workers_take_over_after_the_first_batch(tmp_path, monkeypatch):
    """workers=None: the first batch decodes inline, timed; the rest runs with the workers
    chosen (forced to 2 here), and the store is the one inline decoding makes."""
    import genattr.features.extract as ex

    src = tmp_path / "imgs"
    src.mkdir()
    for k in range(13):
        _rand_image(k, (40 + k, 30)).save(src / f"{k:02d}.png")
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    seen = []
    monkeypatch.setattr(ex, "choose_workers", lambda *a: seen.append(a) or 2)
    a = extract("pixel", src, tmp_path / "a", workers=0, batch_size=4, shard_size=5)
    b = extract("pixel", src, tmp_path / "b", workers=None, batch_size=4, shard_size=5)
    assert len(seen) == 1 and seen[0][0] > 0 and seen[0][1] > 0  # both sides timed
    assert a.store.ids == b.store.ids and a.store.num_shards == b.store.num_shards == 3
    np.testing.assert_array_equal(np.asarray(a.store.vectors), np.asarray(b.store.vectors))
    assert _failed(tmp_path / "a") == _failed(tmp_path / "b")


@pytest.mark.parametrize(
    ("decode_ms", "model_ms", "cores", "device", "workers"),
    [
        (1.5, 13.0, 2, "cpu", 0),  # 32 px PNGs beside EfficientNet-Lite0 on 2 cores (measured)
        (20.0, 13.0, 2, "cpu", 1),  # photo-sized JPEGs: decoding is the bottleneck
        (1.5, 13.0, 16, "cpu", 0),  # many cores, cheap decoding: the model keeps them
        (20.0, 13.0, 16, "cpu", 2),  # more workers would starve the model
        (5.0, 1.0, 16, "cuda", 4),  # a GPU's model is fast and uses no core
        (0.1, 1.0, 16, "cuda", 1),  # even cheap decoding overlaps the GPU's work
    ],
)
def test_decode_workers_follow_the_measured_costs(decode_ms, model_ms, cores, device, workers):
    assert choose_workers(decode_ms / 1e3, model_ms / 1e3, cores, device) == workers


def test_fp16_store_and_bf16_compute(tmp_path):
    src = tmp_path / "imgs"
    src.mkdir()
    for k in range(3):
        _rand_image(k).save(src / f"{k}.png")
    full = extract("pixel", src, tmp_path / "f32", workers=0).store
    half = extract("pixel", src, tmp_path / "f16", workers=0, store_dtype="fp16").store
    assert half.dtype == np.float16 and full.dtype == np.float32
    np.testing.assert_allclose(np.asarray(half.vectors, np.float32), full.vectors[:], atol=1e-3)
    bf = extract("pixel", src, tmp_path / "bf", workers=0, dtype="bf16").store
    np.testing.assert_allclose(bf.vectors[:], full.vectors[:], atol=1e-6)  # Flatten: no matmul


def test_resume_refuses_other_backbone_or_source(tmp_path):
    src = tmp_path / "imgs"
    src.mkdir()
    _rand_image(0).save(src / "0.png")
    extract("pixel", src, tmp_path / "out", workers=0)
    other = get_backbone("pixel")
    other.weights_id = "sha256:other"
    with pytest.raises(GenattrError, match="holds pixel"):
        extract(other, src, tmp_path / "out", workers=0)
    _rand_image(1).save(src / "1.png")
    with pytest.raises(GenattrError, match="differs from"):
        extract("pixel", src, tmp_path / "out", workers=0)
    with pytest.raises(GenattrError, match="shard_size"):
        (src / "1.png").unlink()
        extract("pixel", src, tmp_path / "out", workers=0, shard_size=3)
    with pytest.raises(GenattrError, match="no such file"):
        extract("pixel", tmp_path / "nope.txt", tmp_path / "o2", workers=0)
    with pytest.raises(GenattrError, match="is not an embedding store"):
        extract("pixel", src, src, workers=0)  # a folder with other files in it
    assert EmbeddingStore.open(tmp_path / "out").count == 1


def test_cli_extract(tmp_path):
    from typer.testing import CliRunner

    from genattr.cli import app

    src = tmp_path / "imgs"
    src.mkdir()
    for k in range(3):
        _rand_image(k).save(src / f"{k}.png")
    (src / "bad.png").write_bytes(b"")
    out = tmp_path / "store"
    args = ["extract", "--features", "pixel", "--images", str(src), "--out", str(out)]
    res = CliRunner().invoke(app, [*args, "--workers", "0", "--no-progress", "--shard-size", "2"])
    assert res.exit_code == 0, res.output
    assert "3 vectors" in res.output and "1 failed" in res.output
    assert EmbeddingStore.open(out).num_shards == 2
    res = CliRunner().invoke(app, [*args[:2], "nope", *args[3:], "--no-progress"])
    assert res.exit_code == 2 and "unknown backbone" in res.output


def test_convnet_runs_channels_last_and_the_model_is_given_back(tmp_path):
    import torch

    from genattr.features.registry import Backbone

    src = tmp_path / "imgs"
    src.mkdir()
    for k in range(5):
        _rand_image(k).save(src / f"{k}.png")
    torch.manual_seed(0)
    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, stride=2), torch.nn.Flatten())
    pixel = get_backbone("pixel")
    backbone = Backbone("tiny-conv", 4 * 15 * 15, conv, pixel.preprocess, weights_id="t")
    r = extract(backbone, src, tmp_path / "out", workers=0, batch_size=2)
    assert conv[0].weight.is_contiguous()  # not left in channels_last
    with torch.no_grad():
        x = torch.from_numpy(
            np.stack([pixel.preprocess(Image.open(p)) for p in sorted(src.iterdir())])
        )
        expected = conv(x).numpy()
    np.testing.assert_allclose(np.asarray(r.store.vectors), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("channels_last", [True, False])
def test_stack_batch_layouts(channels_last):
    """Batches hold the same values in either layout, from views of (H, W, 3) memory (what
    ImagePreprocess gives) and from plain (3, H, W) arrays alike."""
    import torch

    from genattr.features.embedder import stack_batch

    rng = np.random.default_rng(1)
    hwc = [rng.random((6, 5, 3), dtype=np.float32) for _ in range(3)]
    chw = [np.ascontiguousarray(a.transpose(2, 0, 1)) for a in hwc]
    expected = np.stack(chw)
    for pixels in ([a.transpose(2, 0, 1) for a in hwc], chw, expected):
        x = stack_batch(pixels, channels_last)
        assert x.shape == (3, 3, 6, 5)
        np.testing.assert_array_equal(x.numpy(), expected)
        layout = torch.channels_last if channels_last else torch.contiguous_format
        assert x.is_contiguous(memory_format=layout)
