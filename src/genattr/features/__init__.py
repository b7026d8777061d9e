"""Feature spaces: a registry of frozen backbones, each with its exact preprocessing."""

# Importing a family module registers its backbones; none imports transformers at module level.
from genattr.features import (  # noqa: F401
    clip,
    dinov2,
    efficientnet,
    moco,
    pixel,
    sscd,
    vit,
    worldcnn,
)
from genattr.features.preprocess import ImagePreprocess
from genattr.features.registry import (
    Backbone,
    BackboneSpec,
    backbone_spec,
    get_backbone,
    list_backbones,
    register_backbone,
)

__all__ = [
    "Backbone",
    "BackboneSpec",
    "ImagePreprocess",
    "backbone_spec",
    "get_backbone",
    "list_backbones",
    "register_backbone",
]
