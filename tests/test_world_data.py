"""The clip-art world's data: names parsed from real package file names, the shipped set and
its hold-out, rendering of a real package PNG, and the word-level tokenizer."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from genattr.world.clipart import (
    CURATED_GROUPS,
    ClipartData,
    caption,
    choose_holdout,
    extend_holdout,
    group_of,
    load_data,
    render,
    resolve_artists,
    split_name,
)

FIXTURES = Path(__file__).parent / "fixtures"

# Real paths from openclipart-png 1:0.18+dfsg-19 (below /usr/share/openclipart/png/).
REAL = {
    "electronics/bulb/light_bulb_karl_bartel_01.png": ("light bulb", "karl_bartel"),
    "people/team_sketch_erich_schube_02.png": ("team sketch", "erich_schube"),
    "recreation/sports/table_tennis_omar_abo-na_01.png": ("table tennis", "omar_abo-na"),
    "animals/mammals/cartoon_cat_gerald_g._01.png": ("cartoon cat", "gerald_g."),
    "animals/mammals/a_simple_pig_01.png": ("simple pig", "simple_pig"),
    "shapes/stars/star_15pt04step.png": ("star ptstep", None),
    "animals/mammals/contour_beaver.png": ("contour beaver", None),
}


@pytest.mark.parametrize("path", sorted(REAL))
def test_split_name_on_real_package_names(path: str) -> None:
    parts = split_name(path)
    title, tail = REAL[path]
    assert (parts.title if tail and tail != "simple_pig" else parts.full_title) == title
    assert parts.tail == tail
    assert parts.categories == tuple(c.replace("_", " ") for c in Path(path).parts[:-1])


def test_cut_artist_names_join_the_full_name() -> None:
    # Stems are cut at 24 characters: 'architetto_franc' is 'architetto_francesco'.
    paths = [
        "animals/mammals/canguro_architetto_franc_01.png",
        "animals/mammals/antilope_architetto_fran_01.png",
        "food/pear_architetto_francesco_01.png",  # short title: the name survives
        "food/apple_architetto_francesco_01.png",
        "people/team_sketch_erich_schube_02.png",  # cut, no longer form known: kept as is
        "people/tux_erich_schubert_01.png",
        "people/sad_erich_schubert_01.png",
        "animals/mammals/a_simple_pig_01.png",  # a tail seen once is part of the title
    ]
    artists = resolve_artists(split_name(p) for p in paths)
    assert artists[:4] == ["architetto_francesco"] * 4
    assert artists[4:7] == ["erich_schubert"] * 3
    assert artists[7] is None


def test_caption() -> None:
    assert caption("parrot", ("animals", "birds")) == "a clipart of a parrot, animals, birds"
    assert caption("apple", ("food", "fruit")) == "a clipart of an apple, food, fruit"
    assert caption("", ("unsorted",)) == "a clipart of an unsorted"


def test_group_of_takes_the_longest_curated_prefix() -> None:
    groups = ("animals", "animals/birds", "food/fruit")
    assert group_of("animals/mammals/big cats", groups) == "animals"
    assert group_of("animals/birds/penguin", groups) == "animals/birds"
    assert group_of("food/fruitcake", groups) is None  # a prefix of the name, not a folder
    assert group_of("food", groups) is None


def test_choose_holdout_spreads_objects_and_caps_groups() -> None:
    folders = ["a"] * 40 + ["b/x"] * 15 + ["b/y"] * 10 + ["c"] * 30
    artists = [None] * 95
    artists[0:3], artists[41:43] = ["ann"] * 3, ["ann"] * 2  # 5 images in two folders
    records = [{"folder": f, "artist": a} for f, a in zip(folders, artists, strict=True)]
    choose_holdout(records, n_objects=9, n_styles=1, groups=("a", "b"), max_group=20, min_left=5)
    split = Counter((r["group"], r["split"]) for r in records)
    assert split[("a", "style-exemplar")] == 3 and split[("b", "style-exemplar")] == 2
    # Taken in turn from each group: 5 from "a", 4 from "b" (not from the ungrouped "c").
    assert split[("a", "object-exemplar")] == 5 and split[("b", "object-exemplar")] == 4
    assert split[("a", "pretrain")] == 20 and split[("b", "pretrain")] == 25 - 2 - 4
    assert split[(None, "unused")] == 30
    ids = [r["model_id"] for r in records if r["split"] == "object-exemplar"]
    assert sorted(ids) == [f"object-{k:03d}" for k in range(9)]
    assert {r["model_id"] for r in records if r["split"] == "style-exemplar"} == {"style-000"}


def test_extend_holdout_takes_only_unused_images() -> None:
    folders = ["a"] * 40 + ["b"] * 12 + ["c/x"] * 6 + ["c/y"] * 6 + ["unsorted"] * 5
    artists: list[str | None] = [None] * 69
    artists[0:3], artists[41:43] = ["ann"] * 3, ["ann"] * 2
    artists[52:54], artists[58:59] = ["bob"] * 2, ["bob"]  # 3 unused images in two folders
    records = [{"folder": f, "artist": a} for f, a in zip(folders, artists, strict=True)]
    choose_holdout(records, n_objects=4, n_styles=1, groups=("a", "b"), max_group=20, min_left=2)
    before = [(r["split"], r["model_id"]) for r in records]
    extend_holdout(records, n_objects=10, n_unobserved=3, groups=("a", "b"))
    # What was held out or pre-trained stays so: a base model trained on it stays valid.
    for (split, mid), r in zip(before, records, strict=True):
        if split != "unused":
            assert (r["split"], r["model_id"]) == (split, mid)
    by_split = Counter((r["group"], r["split"]) for r in records)
    # 6 more objects from group "a"'s surplus ("b" has none left), numbered on from object-004.
    assert by_split[("a", "object-exemplar")] == 2 + 6 and by_split[("b", "object-exemplar")] == 2
    ids = sorted(r["model_id"] for r in records if r["split"] == "object-exemplar")
    assert ids == [f"object-{k:03d}" for k in range(10)]
    # The new artist is a second style; unobserved sets come one per folder outside the groups
    # ("c/x", "c/y"; never "unsorted") in turn.
    assert {r["model_id"] for r, a in zip(records, artists, strict=True) if a == "bob"} == {
        "style-001"
    }
    unobserved = [r for r in records if r["split"] == "unobserved-exemplar"]
    assert sorted(r["model_id"] for r in unobserved) == [
        "unobserved-000",
        "unobserved-001",
        "unobserved-002",
    ]
    assert Counter(r["folder"] for r in unobserved) in (
        Counter({"c/x": 2, "c/y": 1}),
        Counter({"c/x": 1, "c/y": 2}),
    )


def test_render_real_png_on_white() -> None:
    data = (FIXTURES / "pill-button-yellow_benji_01.png").read_bytes()
    arr = render(data, 32)
    assert arr.shape == (32, 32, 3) and arr.dtype == np.uint8
    # Wider than tall: padded with white above and below; the button is yellow in the middle.
    assert (arr[0] == 255).all() and (arr[-1] == 255).all()
    r, g, b = arr[16, 16].astype(int)
    assert r > 150 and g > 120 and b < 120


@pytest.fixture(scope="module")
def shipped() -> ClipartData:
    return load_data()


def test_shipped_data_loads(shipped: ClipartData) -> None:
    assert shipped.images.shape[1:] == (32, 32, 3)
    assert len(shipped.images) == len(shipped.records) > 6000
    assert shipped.info["licence"].startswith("public domain")
    # Deduplicated: no two images identical, no source file twice.
    flat = shipped.images.reshape(len(shipped.images), -1)
    assert len(np.unique(flat, axis=0)) == len(flat)
    assert len({r["sha1"] for r in shipped.records}) == len(shipped.records)


def test_holdout_is_large_enough_and_never_pretrained(shipped: ClipartData) -> None:
    models = shipped.models()
    objects = {k: v for k, v in models.items() if k.startswith("object-")}
    styles = {k: v for k, v in models.items() if k.startswith("style-")}
    assert len(objects) >= 60 and all(len(v) == 1 for v in objects.values())
    # Objects spread over every curated group, and only those groups are pre-trained.
    assert {shipped.records[v[0]]["group"] for v in objects.values()} == set(CURATED_GROUPS)
    unobserved = {k: v for k, v in models.items() if k.startswith("unobserved-")}
    assert len(objects) >= 300 and len(unobserved) >= 60
    assert all(len(v) == 1 for v in unobserved.values())
    # Unobserved exemplars come from kinds pre-training never saw.
    assert all(shipped.records[v[0]]["group"] is None for v in unobserved.values())
    assert len(styles) >= 30 and all(len(v) >= 3 for v in styles.values())
    pre = set(shipped.indices("pretrain").tolist())
    held = {i for v in models.values() for i in v}
    assert not pre & held
    # A style holds out every image of its artist; none of the artist's images is pretrained.
    style_artists = {shipped.records[v[0]]["artist"] for v in styles.values()}
    assert len(style_artists) == len(styles)
    for i in pre:
        assert shipped.records[i]["artist"] not in style_artists
    # Nor is any pixel-identical copy of an exemplar (dedup is by rendering too).
    pre_bytes = {shipped.images[i].tobytes() for i in pre}
    assert not any(shipped.images[i].tobytes() in pre_bytes for i in held)
    assert {shipped.records[i]["group"] for i in pre} == set(CURATED_GROUPS)
    counts = Counter(r["split"] for r in shipped.records)
    assert counts["pretrain"] > 1000


def test_extended_holdout_leaves_pretraining_as_the_base_model_saw_it(
    shipped: ClipartData,
) -> None:
    """The shipped base model was trained on `choose_holdout`'s pre-training split; the
    extended hold-out must not have moved one image into or out of it."""
    import copy

    records = copy.deepcopy(shipped.records)
    choose_holdout(records)
    assert [i for i, r in enumerate(records) if r["split"] == "pretrain"] == list(
        shipped.indices("pretrain")
    )


def test_tokenizer_ids(tmp_path: Path) -> None:
    from genattr.world.tokenizer import build_tokenizer, word_vocab

    caps = ["a clipart of a parrot, animals, birds", "a clipart of a rot, birds"]
    vocab, merges = word_vocab(caps)
    tok = build_tokenizer(caps, max_length=16)
    ids = tok("a clipart of a parrot, animals, birds").input_ids
    words = ["a", "clipart", "of", "a", "parrot", ",", "animals", ",", "birds"]
    expected = [vocab["<|startoftext|>"], *(vocab[w + "</w>"] for w in words)]
    assert ids == [*expected, vocab["<|endoftext|>"]]
    # An unknown word: its longest known ending plus letters, never an unknown token.
    ids = tok("carrot").input_ids[1:-1]
    assert tok.convert_ids_to_tokens(ids) == ["c", "arrot</w>"]  # the end of "parrot"
    assert tok.pad_token_id == vocab["<|endoftext|>"] and tok.model_max_length == 16
    padded = tok("a", padding="max_length", max_length=16).input_ids
    assert len(padded) == 16
    # Saved and reloaded by transformers itself (as a training run does): the same ids.
    from transformers import CLIPTokenizer

    tok.save_pretrained(str(tmp_path / "tok"))
    again = CLIPTokenizer.from_pretrained(str(tmp_path / "tok"))
    for text in (*caps, "carrot", "A picture in the style of <new1> art"):
        assert again(text).input_ids == tok(text).input_ids
    assert len(merges) == len(vocab) - 2 * 68 - 2  # one merge per multi-letter word ending


def test_agreement_and_chance() -> None:
    from genattr.world.quality import agreement_and_chance

    wanted = np.array(["a", "a", "b", "b"])
    assert agreement_and_chance(wanted, wanted) == (1.0, 0.5)
    assert agreement_and_chance(wanted, np.array(["b", "b", "a", "a"])) == (0.0, 0.5)
    # A model that always gives "a": right half the time, and so is chance.
    assert agreement_and_chance(wanted, np.array(["a"] * 4)) == (0.5, 0.5)


@pytest.mark.slow
def test_real_images_agree_with_their_category_above_chance(shipped: ClipartData) -> None:
    """The quality measure's ceiling is real: EfficientNet neighbours of real clip-art share
    its curated group far more often than chance."""
    from genattr.world.quality import _nn, agreement_and_chance, embed

    pre = np.random.default_rng(0).permutation(shipped.indices("pretrain"))[:360]
    feats = embed(shipped.images[pre])
    top = np.array([shipped.records[i]["group"] for i in pre])
    idx, sims = _nn(feats[:60], feats[60:])
    hit, chance = agreement_and_chance(top[:60], top[60:][idx])
    assert hit > chance + 0.2
    assert np.all(sims <= 1.0 + 1e-5) and sims.mean() > 0.5


def _fake_package(root: Path) -> Path:
    """A package tree with real file names, distinct drawings, one copy and one link."""
    from PIL import Image, ImageDraw

    png = root / "usr/share/openclipart/png"
    names = [
        "animals/birds/parrot_gerald_g._01.png",
        "animals/mammals/cartoon_cat_gerald_g._01.png",
        "food/fruit/apple_jon_phillips_01.png",
        "food/fruit/pear_jon_phillips_02.png",
        "shapes/stars/star_15pt04step.png",
    ]
    for k, name in enumerate(names):
        im = Image.new("RGBA", (60, 40), (0, 0, 0, 0))
        ImageDraw.Draw(im).ellipse((5 + 5 * k, 5, 40, 35), fill=(40 * k, 200 - 30 * k, 90, 255))
        (png / name).parent.mkdir(parents=True, exist_ok=True)
        im.save(png / name)
    (png / "unsorted").mkdir()
    (png / "unsorted/parrot_copy.png").write_bytes((png / names[0]).read_bytes())
    (png / "shapes/apple_link_01.png").symlink_to(png / names[2])
    return root


def test_build_data_cli_dedups_and_is_cached(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from genattr.cli import app

    src = _fake_package(tmp_path / "pkg")
    out = tmp_path / "data"
    args = ["world", "build-data", "--source", str(src), "--out", str(out)]
    res = CliRunner().invoke(app, [*args, "--cache", str(tmp_path / "cache")])
    assert res.exit_code == 0, res.output
    data = load_data(out)
    assert len(data.records) == 5 and data.info["duplicate_files"] == 2
    by_source = {r["source"]: r for r in data.records}
    parrot = by_source["animals/birds/parrot_gerald_g._01.png"]
    assert parrot["artist"] == "gerald_g." and parrot["title"] == "parrot"
    assert parrot["caption"] == "a clipart of a parrot, animals, birds"
    assert by_source["shapes/stars/star_15pt04step.png"]["artist"] is None
    # The image is the drawing on white: corners white, centre coloured.
    img = data.images[data.records.index(parrot)]
    assert (img[0, 0] == 255).all() and not (img[16, 10] == 255).all()
    stamp = (out / "clipart32.npz").stat().st_mtime_ns
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0 and "up to date" in res.output
    assert (out / "clipart32.npz").stat().st_mtime_ns == stamp
    res = CliRunner().invoke(app, [*args, "--seed", "1"])  # a new split is a new build
    assert res.exit_code == 0 and (out / "clipart32.npz").stat().st_mtime_ns != stamp
