import numpy as np
import pytest

from genattr.data.benchmark import BenchmarkManifest, CustomizedModel
from genattr.errors import GenattrError
from genattr.features.augment import Augmenter
from genattr.features.extract import extract
from genattr.store import join
from genattr.workflows.train_head import training_pairs_from_stores
from tests.support import drawing


def test_augmenter_is_seeded_and_changes_the_image():
    im = drawing(3)
    a, b = Augmenter("strong", seed=1), Augmenter("mild", seed=1)
    assert np.array_equal(np.asarray(a(im, 5)), np.asarray(a(im, 5)))
    assert not np.array_equal(np.asarray(a(im, 5)), np.asarray(a(im, 6)))
    assert a(im, 5).size == im.size and b(im, 5).mode == "RGB"
    with pytest.raises(ValueError):
        Augmenter("wild")


def test_extract_views_and_training_pairs(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(6):
        drawing(i).save(folder / f"{i}.png")
    plain = extract("pixel", folder, tmp_path / "plain", workers=0).store
    views = extract("pixel", folder, tmp_path / "views", workers=0, augment="strong", views=3).store
    again = extract("pixel", folder, tmp_path / "again", workers=0, augment="strong", views=3).store
    assert views.count == 18
    meta = views.metadata().to_pydict()
    assert meta["view"] == [0, 1, 2] * 6
    v = np.asarray(views.vectors)
    np.testing.assert_array_equal(v[0::3], np.asarray(plain.vectors))  # view 0 is the image as is
    assert not np.allclose(v[1::3], v[0::3])
    np.testing.assert_array_equal(v, np.asarray(again.vectors))  # seeded: repeatable
    with pytest.raises(GenattrError, match="go together"):
        extract("pixel", folder, tmp_path / "bad", workers=0, views=3)

    paths = sorted(str(p) for p in folder.iterdir())
    models = [CustomizedModel(f"m{i}", [paths[i]], {"media": [paths[i + 3]]}) for i in range(3)]
    tc, notes = join.testcase_from_stores(BenchmarkManifest("b", models), views, views)
    assert not notes and tc.exemplar_feats.shape == (3, 3072)
    np.testing.assert_array_equal(tc.exemplar_feats.numpy()[0], v[paths.index(paths[0]) * 3])
    pairs = training_pairs_from_stores(tc, views, views, {0, 2})
    assert pairs.exemplars.shape == (3, 2, 3072) and pairs.synth.shape == (3, 2, 3072)
    assert pairs.synth_model.tolist() == [0, 1] and pairs.exemplar_chunks == [(0, 1), (1, 2)]
