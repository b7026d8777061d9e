"""Embedding stores: sharded .npy vectors + parquet metadata, memory-mapped, one backbone each."""

from genattr.store.convert import (
    gallery_pth_to_store,
    store_to_gallery,
    store_to_gallery_pth,
    store_to_testcase,
    store_to_testcase_pth,
    testcase_pth_to_store,
)
from genattr.store.embedding_store import (
    STORE_FORMAT_VERSION,
    BackboneInfo,
    EmbeddingStore,
    Shard,
    ShardedVectors,
    check_same_backbone,
)

__all__ = [
    "STORE_FORMAT_VERSION",
    "BackboneInfo",
    "EmbeddingStore",
    "Shard",
    "ShardedVectors",
    "check_same_backbone",
    "gallery_pth_to_store",
    "store_to_gallery",
    "store_to_gallery_pth",
    "store_to_testcase",
    "store_to_testcase_pth",
    "testcase_pth_to_store",
]
