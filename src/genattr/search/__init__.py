"""Nearest training images: exact blocked search, and FAISS indexes for large galleries."""

from genattr.search.exact import topk_exact

__all__ = ["topk_exact"]
