"""A word-level CLIP tokenizer built offline from the world's captions.

CLIP's BPE marks only the end of a word (`</w>`), so the merges here grow a word from its end:
`(o, t</w>) -> ot</w>`, `(r, ot</w>) -> rot</w>`, ... Every merge has a word-final token on its
right, so at any moment only the pair at the end of the word can merge: a caption word always
becomes one token, and an unknown word becomes its longest known ending plus single letters
(every letter and punctuation mark is in the vocabulary), never an unknown token.
"""

from __future__ import annotations

import inspect
import json
import re
import string
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

SPECIAL = ("<|startoftext|>", "<|endoftext|>")
_WORD = re.compile(r"[a-z]+")


def word_vocab(captions: Iterable[str], min_count: int = 1) -> tuple[dict[str, int], list[str]]:
    """CLIP `vocab.json` contents and `merges.txt` lines for the words of `captions`."""
    counts: dict[str, int] = {}
    for c in captions:
        for w in _WORD.findall(c.lower()):
            counts[w] = counts.get(w, 0) + 1
    words = sorted(w for w, n in counts.items() if n >= min_count)
    chars = sorted(set(string.ascii_lowercase + string.digits + string.punctuation))
    tokens = [*chars, *(c + "</w>" for c in chars)]
    seen = set(tokens)
    merges: list[str] = []
    for w in words:
        for k in range(len(w) - 2, -1, -1):  # suffix w[k:], made from w[k] + w[k+1:]
            right = w[k + 1 :] + "</w>"
            merged = w[k:] + "</w>"
            if merged not in seen:
                seen.add(merged)
                tokens.append(merged)
                merges.append(f"{w[k]} {right}")
    tokens.extend(SPECIAL)
    return {t: i for i, t in enumerate(tokens)}, merges


def make_tokenizer(vocab: dict[str, int], merges: list[str], max_length: int = 32) -> Any:
    """A `transformers.CLIPTokenizer` from vocab/merges contents (transformers 4 reads files,
    transformers 5 takes the contents: `vocab_file=` would be silently ignored there)."""
    from transformers import CLIPTokenizer

    if "vocab_file" in inspect.signature(CLIPTokenizer.__init__).parameters:  # transformers 4
        with tempfile.TemporaryDirectory() as d:
            (Path(d) / "vocab.json").write_text(json.dumps(vocab))
            (Path(d) / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
            return CLIPTokenizer(
                str(Path(d) / "vocab.json"),
                str(Path(d) / "merges.txt"),
                model_max_length=max_length,
            )
    pairs = [tuple(m.split(" ")) for m in merges]
    # transformers 5 annotates merges as str | list[str], but hands them to tokenizers' BPE,
    # which takes (left, right) pairs
    return CLIPTokenizer(
        vocab=vocab,
        merges=pairs,  # type: ignore[arg-type]
        model_max_length=max_length,
    )


def build_tokenizer(captions: Iterable[str], max_length: int = 32, min_count: int = 1) -> Any:
    """The world's tokenizer for the words used at least `min_count` times in `captions` (rarer
    words are spelt from known endings and letters)."""
    vocab, merges = word_vocab(captions, min_count)
    return make_tokenizer(vocab, merges, max_length)
