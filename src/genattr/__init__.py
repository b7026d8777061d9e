"""genattr: which training images are responsible for a generated image, and how much."""

__version__ = "0.1.0"
