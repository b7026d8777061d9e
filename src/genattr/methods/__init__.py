"""Attribution methods beyond feature similarity (issue 17); first, gradients (TRAK / D-TRAK)."""

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

__all__ = [
    "GradientSpec",
    "SparseProjection",
    "fixed_noises",
    "gradient_scores",
    "loss_gradients",
    "projected_gradients",
    "select_parameters",
    "spec_timesteps",
]
