"""The demo's attributed test queries: a seeded draw of test samples (`draw_queries`,
`QUERY_SEED`), each attributed over the whole training set with the best backbone's head,
where each of its model's true exemplars ranked and the influence it got (`ShownQuery`), and
the shown set's hit rate beside the evaluation's Recall@K (`shown_summary`).
`genattr.workflows.demo` runs this after evaluating every backbone."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from genattr.attribution import Attribution, Attributor
from genattr.data.benchmark import BenchmarkManifest, CustomizedModel
from genattr.errors import GenattrError
from genattr.evaluate import EvaluationResult
from genattr.workflows.index import build_index_from_store

# The world's test cases (genattr.world.benchmark.TEST_CASES), in the order they are reported.
CASES = ("object", "unobserved", "style")
# The attributed test queries the report shows: a seeded draw of samples, in turn from each
# test case (`draw_queries`); the first sample of the first models once showed only misses.
QUERY_SEED = 20231
SHOWN_K = 10  # training images shown per query, and the K of the shown set's hit rate


@dataclass
class ShownQuery:
    """One attributed test query of the report: its top `SHOWN_K` as shown, and where each
    of its model's true exemplars ranked in the attribution over the whole gallery."""

    model: CustomizedModel
    case: str
    prompt_type: str
    answer: Attribution  # the top SHOWN_K training images, as the report shows them
    exemplar_ranks: list[int]  # 1-based rank of each of the model's exemplars, in its order
    exemplar_influence: list[float | None]  # the calibrated influence each got (None: none)
    gallery_size: int

    @property
    def best(self) -> int:
        """Which of the model's exemplars ranked first (its index in `model.exemplars`)."""
        return int(np.argmin(self.exemplar_ranks))

    @property
    def rank(self) -> int:
        """The rank of the best-ranked true exemplar (the only one, for objects)."""
        return self.exemplar_ranks[self.best]

    @property
    def influence(self) -> float | None:
        """The influence the best-ranked true exemplar got."""
        return self.exemplar_influence[self.best]

    @property
    def hit(self) -> bool:
        """A true exemplar among the `SHOWN_K` training images shown."""
        return self.rank <= SHOWN_K

    def to_json(self) -> dict:
        return {
            "model": self.model.id,
            "case": self.case,
            "prompt_type": self.prompt_type,
            "query": self.answer.query,
            "rank": self.rank,
            "influence": self.influence,
            "hit": self.hit,
            "exemplars": [
                {"path": p, "rank": r, "influence": i}
                for p, r, i in zip(
                    self.model.exemplars, self.exemplar_ranks, self.exemplar_influence, strict=True
                )
            ],
        }


class EvaluatedBackbone(Protocol):
    """What `shown_summary` reads of a backbone's results (`genattr.workflows.demo.
    BackboneOutcome`): its name, the head's evaluation and its controls."""

    @property
    def name(self) -> str: ...

    @property
    def head(self) -> EvaluationResult: ...

    @property
    def controls(self) -> dict[str, EvaluationResult]: ...


def draw_queries(
    test: BenchmarkManifest, n: int, seed: int = QUERY_SEED
) -> list[tuple[CustomizedModel, str, str]]:
    """`n` test queries as (model, prompt type, sample path), drawn by
    `numpy.random.default_rng(seed)`: each test case's models in a shuffled order, one
    random sample (of any prompt type) of each, taken in turn from each test case in `CASES`
    order; a model is drawn again only once every model of its case has been. The same seed
    draws the same queries."""
    rng = np.random.default_rng(seed)
    pools = []
    for case in CASES:
        models = [m for m in test.models if m.extra.get("case", m.mode) == case]
        samples = [[(m, t, path) for t, paths in m.synth.items() for path in paths] for m in models]
        pool: list[tuple[CustomizedModel, str, str]] = []
        while any(samples):  # rounds: every model of the case once, in a shuffled order
            order = [i for i in rng.permutation(len(models)) if samples[i]]
            pool += [samples[i].pop(rng.integers(len(samples[i]))) for i in order]
        pools.append(pool)
    chosen: list[tuple[CustomizedModel, str, str]] = []
    while len(chosen) < n and any(pools):  # in turn from each test case
        for pool in pools:
            if pool and len(chosen) < n:
                chosen.append(pool.pop(0))
    return chosen


def attribute_queries(
    out: Path, backbone: str, test: BenchmarkManifest, n: int
) -> list[ShownQuery]:
    """Index the whole training set (pre-training images and exemplars) with the best head,
    attribute `n` drawn test queries (`draw_queries`), and find where each true exemplar
    ranked in the attribution over the whole gallery and the influence it got. `out` is the
    demo's folder: its stores, heads and calibrators per backbone; the index goes to
    `out/index`."""
    stores = out / "stores" / backbone
    index = out / "index"
    build_index_from_store(
        [stores / "pretrain", stores / "exemplars"], index, head=out / "heads" / backbone
    )
    picks = draw_queries(test, n)
    attributor = Attributor.load(index, out / "calibrators" / f"{backbone}.json")
    paths = [path for _, _, path in picks]
    answers = attributor.attribute(paths, top_k=SHOWN_K)
    # the same attribution over every gallery image: each true exemplar's rank and influence
    full = attributor.attribute(paths, top_k=attributor.index.count)
    shown = []
    for (m, ptype, _), answer, everything in zip(picks, answers, full, strict=True):
        found = {os.path.normpath(r.path): r for r in everything.results}
        missing = [p for p in m.exemplars if os.path.normpath(p) not in found]
        if missing:
            raise GenattrError(f"{index}: exemplar {missing[0]} of {m.id} is not in the index")
        ex = [found[os.path.normpath(p)] for p in m.exemplars]
        shown.append(
            ShownQuery(
                m,
                m.extra.get("case", m.mode),
                ptype,
                answer,
                [r.rank for r in ex],
                [r.influence for r in ex],
                attributor.index.count,
            )
        )
    return shown


def shown_summary(shown: Sequence[ShownQuery], outcome: EvaluatedBackbone) -> dict[str, Any]:
    """The shown queries' hit rate beside the evaluation's, per test case and in all: how
    many shown queries have a true exemplar in their top `SHOWN_K` ("hit_rate"), and from the
    evaluation's per-query Recall@K (`outcome`'s head) over every test query: the fraction
    that has one on the stricter gallery, the attribution's own gallery of pre-training
    images and every exemplar ("all_hit_rate_stricter"), and the mean Recall@K there
    ("recall_stricter") and on the AbC protocol's gallery ("recall", the report's tables).
    "all" weighs the test cases as the shown queries do."""
    strict = outcome.controls["head, stricter gallery"]
    col = outcome.head.ks.index(SHOWN_K)

    def recalls(res: EvaluationResult, case: str) -> np.ndarray:
        return np.concatenate(
            [r.recall[:, col] for p, r in res.per_type.items() if p.split(": ")[0] == case]
        )

    cases: dict[str, dict[str, Any]] = {}
    for case in CASES:
        mine = [q for q in shown if q.case == case]
        if not mine:
            continue
        on_strict = recalls(strict, case)
        cases[case] = {
            "shown": len(mine),
            "hits": sum(q.hit for q in mine),
            "hit_rate": float(np.mean([q.hit for q in mine])),
            "all_hit_rate_stricter": float(np.mean(on_strict > 0)),
            "recall_stricter": float(on_strict.mean()),
            "recall": float(recalls(outcome.head, case).mean()),
        }
    n = sum(c["shown"] for c in cases.values())

    def weighted(key: str) -> float:
        return float(sum(c["shown"] * c[key] for c in cases.values()) / max(n, 1))

    overall = {"shown": n, "hits": sum(c["hits"] for c in cases.values())}
    overall["hit_rate"] = overall["hits"] / max(n, 1)
    overall.update({k: weighted(k) for k in ("all_hit_rate_stricter", "recall_stricter", "recall")})
    return {
        "backbone": outcome.name,
        "seed": QUERY_SEED,
        "top_k": SHOWN_K,
        "gallery_size": shown[0].gallery_size if shown else 0,
        "queries": [q.to_json() for q in shown],
        "cases": cases,
        "all": overall,
    }
