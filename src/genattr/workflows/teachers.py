"""Teacher files from a counterfactual study: any scored method's ranking, or the margins
themselves, over the study's models, for `genattr train-head --objective distill`.

One teacher pools every case: each query (written as a PNG under
WORK/<case>/queries/<row>.png, so a feature store can be extracted from the folder) against
every case's training images (their files); a query's row holds its own model's scores and
NaN on the other models' images, which the distiller never ranks and draws as outliers
(images its model was not trained on).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from genattr.counterfactual import margin_contrast
from genattr.errors import GenattrError
from genattr.heads.distill import Teacher, pool_teachers, write_teacher
from genattr.workflows.counterfactual import SetCase
from genattr.workflows.counterfactual_scores import load_scores, scored_labels, slug
from genattr.world.clipart import save_png

MARGINS = "margins"  # the teacher read off the margins: `margin_contrast` of the seed mean


def case_teacher_scores(work: str | Path, case: SetCase, label: str) -> np.ndarray:
    """(Q, N) the case's teacher scores: a scored label's, or with `MARGINS` the margin
    contrast of the seed-mean margins (the study's margins built)."""
    work = Path(work)
    if label == MARGINS:
        path = work / case.id / "margins.npz"
        if not path.is_file():
            raise GenattrError(f"{case.id}: no margins yet ({path}); finish the study first")
        got = np.load(path)
        return margin_contrast(got["masks"], got["margins"].mean(axis=0))
    known = scored_labels(work, case)
    if label not in known and label not in {slug(x) for x in known}:
        raise GenattrError(
            f"{case.id} has no scores {label!r}; scored: {', '.join(known) or 'none'}, or {MARGINS}"
        )
    name = label if label in known else next(x for x in known if slug(x) == label)
    return load_scores(work, case, [name])[name]


def study_teacher(work: str | Path, cases: Sequence[SetCase], label: str) -> Teacher:
    """One teacher over every case (see the module's docstring); queries that a slow
    method did not score (NaN rows) are left out."""
    work = Path(work)
    blocks, query_paths, candidate_paths = [], [], []
    for case in cases:
        scores = case_teacher_scores(work, case, label)
        rows = np.flatnonzero(np.isfinite(scores).any(axis=1))
        blocks.append(scores[rows])
        query_paths += [
            save_png(case.queries.images[r], work / case.id / "queries" / f"{r:05d}.png")
            for r in rows
        ]
        candidate_paths += [str(p) for p in case.train_paths]
    scores = pool_teachers(blocks).astype(np.float32)
    return Teacher(query_paths, candidate_paths, scores, label)


def write_study_teacher(
    work: str | Path, cases: Sequence[SetCase], label: str, out: str | Path | None = None
) -> Path:
    """`study_teacher` written as a teacher file (default WORK/teachers/<label>.npz)."""
    path = Path(out) if out else Path(work) / "teachers" / f"{slug(label)}.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_teacher(study_teacher(work, cases, label), path)
