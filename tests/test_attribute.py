import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from genattr.attribution import AttributedImage, Attribution, attribute
from genattr.calibrate import Calibrator
from genattr.errors import GenattrError
from genattr.features import get_backbone
from genattr.report.attributions import write_attributions
from genattr.search.index import build_index
from tests.support import drawing


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    backbone = get_backbone("pixel")
    paths = []
    for i in range(80):
        p = root / "train" / f"img_{i:03d}.png"
        p.parent.mkdir(exist_ok=True)
        drawing(i).save(p)
        paths.append(str(p))
    feats = torch.cat(
        [
            backbone.embed(
                torch.from_numpy(backbone.preprocess(Image.open(p).convert("RGB")))[None]
            )
            for p in paths
        ]
    )
    index = build_index(
        feats.numpy(),
        root / "index",
        ids=[f"train-{i}" for i in range(80)],
        paths=paths,
        provenance={"backbone": {"name": "pixel", "weights_id": backbone.weights_id}},
    )
    # a "generated" image: training image 7, slightly altered
    query = drawing(7)
    ImageDraw.Draw(query).line([0, 0, 63, 63], fill=(255, 255, 255), width=2)
    query.save(root / "generated.png")
    return root, index


def test_attribute_finds_the_source_with_exact_influence(world):
    root, index = world
    cal = Calibrator(inv_tau=60.0, bias=-50.0)
    [answer] = attribute([root / "generated.png"], index, cal, top_k=5)
    assert answer.results[0].id == "train-7" and answer.results[0].rank == 1
    sims = [r.similarity for r in answer.results]
    assert sims == sorted(sims, reverse=True)
    # influence is normalised over the whole gallery: recompute it from every similarity
    all_sims, _ = index.search(_query_vector(root / "generated.png"), index.count)
    full = cal.probabilities(all_sims[0])
    np.testing.assert_allclose([r.influence for r in answer.results], full[:5], atol=1e-6)
    assert answer.remaining_influence == pytest.approx(1 - full[:5].sum(), abs=1e-6)
    assert answer.exact and answer.results[0].influence > 0.3


def _query_vector(path):
    backbone = get_backbone("pixel")
    x = torch.from_numpy(backbone.preprocess(Image.open(path).convert("RGB")))[None]
    return torch.nn.functional.normalize(backbone.embed(x), dim=-1).numpy()


def test_without_calibrator_and_outputs(world, tmp_path):
    root, index = world
    answers = attribute(
        [root / "generated.png", root / "train" / "img_003.png"], index, None, top_k=3
    )
    assert answers[1].results[0].id == "train-3"
    assert answers[1].results[0].similarity == pytest.approx(1.0, abs=1e-5)
    assert answers[0].results[0].influence is None and answers[0].remaining_influence is None
    cal_answers = attribute([root / "generated.png"], index, Calibrator(60.0, -50.0), top_k=3)
    write_attributions(cal_answers, "json", tmp_path / "a.json")
    doc = json.loads((tmp_path / "a.json").read_text())
    assert doc[0]["query"].endswith("generated.png")
    assert set(doc[0]["results"][0]) >= {"rank", "id", "path", "similarity", "influence"}
    assert 0 <= doc[0]["remaining_influence"] <= 1
    write_attributions(cal_answers, "html", tmp_path / "a.html")
    page = (tmp_path / "a.html").read_text()
    assert page.count("<img") == 1 + 3 and "img_007.png" in page and "Influence outside" in page


def test_attribution_page_escapes_every_name(tmp_path):
    """Query names, gallery paths, ids and notes are text in the page, never markup."""
    hostile = "<script>alert(1)</script>"
    answer = Attribution(
        f"gen{hostile}.png",
        [AttributedImage(1, f"id{hostile}", f"/no/{hostile}.png", 0.9, 0.4)],
        0.6,
        notes=[f"note {hostile}"],
    )
    write_attributions([answer], "html", tmp_path / "a.html")
    page = (tmp_path / "a.html").read_text()
    assert "<script>" not in page
    assert page.count("&lt;script&gt;alert(1)&lt;/script&gt;") == 3  # query, path, note
    assert "40.00 %" in page and "60.00 %" in page


def test_bad_query_image(world, tmp_path):
    _, index = world
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    with pytest.raises(GenattrError, match=r"bad\.png"):
        attribute([tmp_path / "bad.png"], index)
    with pytest.raises(GenattrError, match="top-k"):
        attribute([tmp_path / "bad.png"], index, top_k=0)


def test_top_level_call(world):
    import genattr

    root, index = world
    [answer] = genattr.attribute(
        [root / "generated.png"], index=index, calibrator=Calibrator(60.0, -50.0)
    )
    assert answer.results[0].id == "train-7" and len(answer.results) == 20
