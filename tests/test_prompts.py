"""Prompt sets as data: the authors' sets, articles, captions files, errors."""

from __future__ import annotations

import json

import pytest

from genattr.customize.plan import assign_split
from genattr.customize.prompts import (
    builtin_prompt_sets,
    indefinite_article,
    load_prompt_set,
    read_captions,
)
from genattr.errors import GenattrError


def test_shipped_sets_are_listed():
    assert set(builtin_prompt_sets()) >= {"media", "captions", "style-scene", "style-object"}


def test_media_prompts_with_articles():
    prompts = load_prompt_set("media").render("bird")
    assert len(prompts) == 10
    assert prompts[0] == "a charcoal drawing of <new1> bird"
    assert prompts[2] == "a photo of <new1> bird"
    assert "an ink drawing of <new1> bird" in prompts
    assert "an oil on canvas painting of <new1> bird" in prompts
    assert "an ultrafine detailed painting of <new1> bird" in prompts
    assert "a watercolor painting of <new1> bird" in prompts
    assert all(p.startswith(("a ", "an ")) for p in prompts)


def test_style_sets():
    scenes = load_prompt_set("style-scene").render()
    assert len(scenes) == 10
    assert scenes[0] == "The beauty of stillness in the style of <new1> art"
    assert scenes[-1] == "The stillness of the sea in the style of <new1> art"
    objects = load_prompt_set("style-object").render()
    assert len(objects) == 10
    assert "A painting of an animal in the style of <new1> art" in objects
    assert "A painting of a tree in the style of <new1> art" in objects
    assert "A painting of the sun in the style of <new1> art" in objects
    assert "A painting of grass in the style of <new1> art" in objects


@pytest.mark.parametrize(
    ("phrase", "article"),
    [
        ("apple", "an"),
        ("umbrella", "an"),
        ("hourglass", "an"),
        ("unicycle", "a"),
        ("European fire salamander", "a"),
        ("one-piece swimsuit", "a"),
        ("tattoo", "a"),
        ("Egyptian cat", "an"),
    ],
)
def test_indefinite_article(phrase, article):
    assert indefinite_article(phrase) == article


def test_media_needs_a_category():
    with pytest.raises(GenattrError, match="category"):
        load_prompt_set("media").render()


def test_captions_from_json_and_text(tmp_path):
    path = tmp_path / "caps.json"
    path.write_text(json.dumps({"fish": ["A school of <new1> fish swimming in the ocean"]}))
    caps = read_captions(path)
    assert load_prompt_set("captions").render("fish", caps) == [
        "A school of <new1> fish swimming in the ocean"
    ]
    with pytest.raises(GenattrError, match="no sentences for category 'dog'"):
        load_prompt_set("captions").render("dog", caps)
    text = tmp_path / "caps.txt"
    text.write_text("# any category\nA <new1> {category} at dawn\n\nTwo <new1> {category}s\n")
    assert load_prompt_set("captions").render("dog", read_captions(text)) == [
        "A <new1> dog at dawn",
        "Two <new1> dogs",
    ]
    with pytest.raises(GenattrError, match="captions file"):
        load_prompt_set("captions").render("dog")


def test_caption_without_token_is_refused(tmp_path):
    path = tmp_path / "caps.json"
    path.write_text(json.dumps({"fish": ["A school of fish"]}))
    with pytest.raises(GenattrError, match="lacks <new1>"):
        read_captions(path)


def test_user_prompt_set_file(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(
        json.dumps(
            {
                "format_version": 1,
                "name": "mine",
                "prompt_type": "light",
                "template": "{light|a} light on <new1> {category}",
                "slots": {"light": ["evening", "morning"]},
            }
        )
    )
    pset = load_prompt_set(path)
    assert pset.prompt_type == "light"
    assert pset.render("vase") == [
        "an evening light on <new1> vase",
        "a morning light on <new1> vase",
    ]
    with pytest.raises(GenattrError, match="unknown prompt set"):
        load_prompt_set("no-such-set")


def test_split_by_model_is_stable_and_proportional():
    fractions = {"train": 0.8, "val": 0.1, "test": 0.1}
    splits = [assign_split(f"model_{i}", fractions) for i in range(3000)]
    assert splits == [assign_split(f"model_{i}", fractions) for i in range(3000)]
    share = {s: splits.count(s) / len(splits) for s in fractions}
    for s, f in fractions.items():
        assert abs(share[s] - f) < 0.03, share
    assert {assign_split(f"m{i}", {"test": 1.0}) for i in range(50)} == {"test"}


@pytest.mark.parametrize(
    ("section", "options", "says"),
    [
        ("train", {"max_train_steps": "lots"}, "max_train_steps: input should be a valid integer"),
        ("train", {"max_train_steps": -3}, "max_train_steps: input should be greater than"),
        ("train", {"learning_rate": 0}, "learning_rate: input should be greater than 0"),
        ("train", {"warmup": 5}, "unknown training option(s) ['warmup']"),
        ("sample", {"steps": 0}, "steps: input should be greater than or equal to 1"),
        ("sample", {"images_per_prompt": "two"}, "images_per_prompt: input should be a valid"),
    ],
)
def test_plan_options_are_typed_when_the_plan_is_read(tmp_path, section, options, says):
    """A wrong type or value in `train:` / `sample:` stops read_plan, naming the option,
    before any model would load; right ones (numbers as strings too) pass."""
    from PIL import Image

    from genattr.customize.plan import read_plan

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    plan = {
        "name": "p",
        "base": "some/model",
        "prompt_sets": {"object": ["media"]},
        "models": [{"id": "m0", "mode": "object", "category": "dog", "exemplars": ["a.png"]}],
    }
    (tmp_path / "bad.json").write_text(json.dumps({**plan, section: options}))
    with pytest.raises(GenattrError) as err:
        read_plan(tmp_path / "bad.json")
    assert says in str(err.value)
    good = {"train": {"max_train_steps": "80"}, "sample": {"steps": 3}}
    (tmp_path / "good.json").write_text(json.dumps({**plan, **good}))
    read = read_plan(tmp_path / "good.json")
    assert read.models[0].train.max_train_steps == 80 and read.sample.steps == 3
