"""Counterfactual ground truth: retrain without training images and see which attribution
method predicted what changed (LDS, leave-K-out). In-memory algorithms only; building the
subset models and measuring their margins from files is `genattr.workflows.counterfactual`."""

from genattr.counterfactual.metrics import (
    Summary,
    exemplar_ap,
    lds,
    leave_k_out_masks,
    margin_contrast,
    paired_difference,
    rank_agreement,
    seed_ceiling,
    spearman_rows,
    subset_predictions,
    summarize,
    top_k,
)
from genattr.counterfactual.subsets import draw_subsets

__all__ = [
    "Summary",
    "draw_subsets",
    "exemplar_ap",
    "lds",
    "leave_k_out_masks",
    "margin_contrast",
    "paired_difference",
    "rank_agreement",
    "seed_ceiling",
    "spearman_rows",
    "subset_predictions",
    "summarize",
    "top_k",
]
