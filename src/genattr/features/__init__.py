"""Feature spaces: a registry of frozen backbones, each with its exact preprocessing."""

from genattr.features import pixel  # noqa: F401  (registers its backbone)
from genattr.features.registry import Backbone, get_backbone, list_backbones, register_backbone

__all__ = ["Backbone", "get_backbone", "list_backbones", "register_backbone"]
