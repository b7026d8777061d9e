"""Sampling prompt sets, kept as data (`prompt_sets/*.json`) so a benchmark's prompts are
readable, diffable and editable without touching code.

A set file is `{"format_version": 1, "name", "prompt_type", "mode", "template", "slots",
"articles"}`. The template names slots in braces; `{x|a}` puts the right indefinite article
before the value ("an ink drawing", "a photo"), `{x|cap}` capitalises it, and `{category}` is the
object category given at render time. Slot lists are walked in step: prompt i takes value i of
every slot. A set with `"source": "captions"` takes its sentences from a user file instead (the
authors' ChatGPT captions, one list per category).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from genattr.errors import GenattrError

MODIFIER_TOKEN = "<new1>"
PROMPT_SET_FORMAT_VERSION = 1

# Words whose spelling misleads the vowel rule: a silent h ("an hour"), or a vowel letter said
# with a consonant sound ("a unicorn", "a one-piece", "a European").
_AN_EXCEPTIONS = ("hour", "honest", "honor", "honour", "heir", "herb")
_A_PREFIXES = ("uni", "use", "usu", "uti", "ure", "uro", "eu", "ewe", "one", "once", "ufo", "uk")


def indefinite_article(phrase: str) -> str:
    """'a' or 'an' for the phrase that follows, by its first word's sound (common English rules)."""
    word = phrase.strip().split(" ", 1)[0].lower()
    if not word:
        raise GenattrError("cannot choose an article for an empty phrase")
    if word.startswith(_AN_EXCEPTIONS):
        return "an"
    if word.startswith(_A_PREFIXES):
        return "a"
    return "an" if word[0] in "aeiou" else "a"


def with_article(phrase: str, article: str | None = None) -> str:
    """The phrase with its article; `article` overrides ("the", or "" for none)."""
    art = indefinite_article(phrase) if article is None else article
    return f"{art} {phrase}" if art else phrase


@dataclass(frozen=True)
class PromptSet:
    """One prompt type of a benchmark: how to turn a model (category, captions) into prompts."""

    name: str
    prompt_type: str
    mode: str | None = None
    template: str | None = None
    slots: dict[str, list[str]] = field(default_factory=dict)
    articles: dict[str, str] = field(default_factory=dict)
    source: str = "template"
    description: str = ""

    def render(
        self, category: str | None = None, captions: dict[str, list[str]] | None = None
    ) -> list[str]:
        """The prompts of this set for one model; every prompt carries the modifier token."""
        if self.source == "captions":
            prompts = _captions_for(self.name, category, captions)
        else:
            prompts = self._render_template(category)
        for p in prompts:
            if MODIFIER_TOKEN not in p:
                raise GenattrError(f"prompt set {self.name!r}: {p!r} lacks {MODIFIER_TOKEN}")
        return prompts

    def _render_template(self, category: str | None) -> list[str]:
        assert self.template is not None
        n = len(next(iter(self.slots.values())))
        prompts = []
        for i in range(n):
            values = {k: v[i] for k, v in self.slots.items()}
            if category is not None:
                values["category"] = category
            prompts.append(_fill(self.template, values, self.articles, self.name))
        return prompts


_FIELD = re.compile(r"\{(\w+)((?:\|\w+)*)\}")


def _fill(template: str, values: dict[str, str], articles: dict[str, str], name: str) -> str:
    def sub(m: re.Match) -> str:
        key, filters = m.group(1), [f for f in m.group(2).split("|") if f]
        if key not in values:
            what = "a --category" if key == "category" else f"slot {key!r}"
            raise GenattrError(f"prompt set {name!r} needs {what}")
        out = values[key]
        for f in filters:
            if f == "a":
                out = with_article(out, articles.get(values[key]))
            elif f == "cap":
                out = out[:1].upper() + out[1:]
            else:
                raise GenattrError(f"prompt set {name!r}: unknown filter |{f}")
        return out

    return _FIELD.sub(sub, template)


def _captions_for(
    name: str, category: str | None, captions: dict[str, list[str]] | None
) -> list[str]:
    if captions is None:
        raise GenattrError(f"prompt set {name!r} takes its sentences from a captions file")
    key = category if category in captions else "*" if "*" in captions else None
    if key is None:
        raise GenattrError(f"captions file has no sentences for category {category!r}")
    return [s.replace("{category}", category or "") for s in captions[key]]


def builtin_prompt_sets() -> list[str]:
    """Names of the sets shipped with genattr."""
    files = resources.files("genattr.customize").joinpath("prompt_sets")
    return sorted(p.name[: -len(".json")] for p in files.iterdir() if p.name.endswith(".json"))


def load_prompt_set(name_or_path: str | os.PathLike) -> PromptSet:
    """A shipped set by name (`media`, `captions`, `style-scene`, `style-object`) or a set file."""
    path = Path(name_or_path)
    if path.suffix.lower() in (".json", ".yaml", ".yml") or path.exists():
        data = _read_data(path)
        where = str(path)
    else:
        res = resources.files("genattr.customize").joinpath("prompt_sets", f"{name_or_path}.json")
        if not res.is_file():
            known = ", ".join(builtin_prompt_sets())
            raise GenattrError(f"unknown prompt set {str(name_or_path)!r} (shipped: {known})")
        data = json.loads(res.read_text())
        where = str(name_or_path)
    return _parse_set(data, where)


def _parse_set(data: Any, where: str) -> PromptSet:
    if not isinstance(data, dict):
        raise GenattrError(f"{where}: a prompt set is a mapping")
    if data.get("format_version") != PROMPT_SET_FORMAT_VERSION:
        raise GenattrError(f"{where}: format_version must be {PROMPT_SET_FORMAT_VERSION}")
    source = data.get("source", "template")
    slots = data.get("slots", {})
    if source == "template":
        if not isinstance(data.get("template"), str):
            raise GenattrError(f"{where}: 'template' must be a string")
        ok = isinstance(slots, dict) and slots and all(_is_str_list(v) for v in slots.values())
        if not ok or len({len(v) for v in slots.values()}) != 1:
            raise GenattrError(f"{where}: 'slots' must map names to string lists of one length")
    elif source != "captions":
        raise GenattrError(f"{where}: 'source' must be 'template' or 'captions'")
    mode = data.get("mode")
    if mode not in (None, "object", "style"):
        raise GenattrError(f"{where}: 'mode' must be object or style")
    name = str(data.get("name", Path(where).stem))
    return PromptSet(
        name=name,
        prompt_type=str(data.get("prompt_type", name)),
        mode=mode,
        template=data.get("template"),
        slots={k: list(v) for k, v in slots.items()},
        articles=dict(data.get("articles", {})),
        source=source,
        description=str(data.get("description", "")),
    )


def _is_str_list(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(s, str) for s in v)


def _read_data(path: Path) -> Any:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise GenattrError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise GenattrError(f"{path}: cannot read ({e})") from None
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise GenattrError(f"{path}: not valid YAML ({e})") from None
    if path.suffix.lower() == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise GenattrError(f"{path}: not valid JSON ({e})") from None
    return text


def read_captions(path: str | os.PathLike) -> dict[str, list[str]]:
    """Caption sentences per category from JSON/YAML (`{category: [sentences]}`) or a text file
    (one sentence per line, used for every category). Each sentence names `<new1>`."""
    path = Path(path)
    data = _read_data(path)
    if isinstance(data, str):
        lines = [ln.strip() for ln in data.splitlines() if ln.strip() and not ln.startswith("#")]
        data = {"*": lines}
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and _is_str_list(v) for k, v in data.items()
    ):
        raise GenattrError(f"{path}: captions must map each category to a list of sentences")
    for cat, sentences in data.items():
        for s in sentences:
            if MODIFIER_TOKEN not in s:
                raise GenattrError(f"{path}: caption for {cat!r} lacks {MODIFIER_TOKEN}: {s!r}")
    return data


def read_image_captions(
    value: str | os.PathLike | Sequence[str] | Mapping[str, str],
    images: Sequence[Path],
    root: Path | None = None,
) -> list[str]:
    """One caption per image of a captioned set, from a list (image order), a mapping from
    each image's file name to its caption (MSCOCO-style pairs), or a file holding either (a
    text file: one caption per line, image order). Relative paths resolve against `root`."""
    data: Any
    if isinstance(value, Mapping):
        data, where = dict(value), "captions"
    elif isinstance(value, (str, os.PathLike)):
        path = Path(value)
        path = path if path.is_absolute() or root is None else root / path
        data = _read_data(path)
        if isinstance(data, str):
            data = [ln.strip() for ln in data.splitlines() if ln.strip()]
        where = str(path)
    else:
        data, where = list(value), "captions"
    if isinstance(data, dict):
        missing = [p.name for p in images if p.name not in data]
        if missing:
            raise GenattrError(f"{where}: no caption for {missing[0]} ({len(missing)} missing)")
        data = [data[p.name] for p in images]
    if not isinstance(data, list) or not all(isinstance(c, str) and c.strip() for c in data):
        raise GenattrError(f"{where}: captions must be non-empty strings, one per image")
    if len(data) != len(images):
        raise GenattrError(f"{where}: {len(data)} captions for {len(images)} images")
    return [c.strip() for c in data]


def with_token(prompts: Sequence[str], token: str) -> list[str]:
    """The prompts for another concept of a multi-concept model: `<new1>` (every prompt set's
    modifier token) replaced by the concept's token, e.g. `<new3>`."""
    out = []
    for p in prompts:
        if MODIFIER_TOKEN not in p:
            raise GenattrError(f"prompt {p!r} lacks {MODIFIER_TOKEN}")
        out.append(p.replace(MODIFIER_TOKEN, token))
    return out
