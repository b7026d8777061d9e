"""genattr: which training images are responsible for a generated image, and how much."""

from __future__ import annotations

__version__ = "0.1.0"


def attribute(images, index, calibrator=None, top_k: int = 20, **kwargs):
    """Which training images made each image, and how much: see `genattr.attribution`.

    `genattr.attribute(["gen.png"], index="index/", calibrator="calibrator.json")` returns one
    `Attribution` per image (ranked training images with similarity and influence).
    """
    # deferred: every `import genattr.<module>` runs this file first; genattr.attribution
    # would load torch, features, heads and search into each of them (and the top layer into
    # the package that its lower layers belong to)
    from genattr.attribution import attribute as run

    return run(images, index, calibrator, top_k, **kwargs)
