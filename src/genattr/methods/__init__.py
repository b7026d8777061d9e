"""Attribution methods beyond feature similarity (issue 17): gradients (TRAK / D-TRAK) and
unlearning (AbU)."""

from genattr.methods.gradient import (
    GradientSpec,
    SparseProjection,
    fixed_noises,
    gradient_scores,
    loss_gradients,
    projected_gradients,
    select_parameters,
    spec_timesteps,
)
from genattr.methods.unlearning import (
    UnlearningSpec,
    fisher_diagonal,
    image_losses,
    resolved_step_size,
    unlearned,
    unlearning_scores,
)

__all__ = [
    "GradientSpec",
    "SparseProjection",
    "UnlearningSpec",
    "fisher_diagonal",
    "fixed_noises",
    "gradient_scores",
    "image_losses",
    "loss_gradients",
    "projected_gradients",
    "resolved_step_size",
    "select_parameters",
    "spec_timesteps",
    "unlearned",
    "unlearning_scores",
]
