"""Benchmarks and feature files, in the authors' formats and genattr's own."""

from genattr.data.benchmark import (
    BenchmarkManifest,
    CustomizedModel,
    read_abc_json,
    read_benchmark,
    read_manifest,
    write_abc_json,
    write_manifest,
)
from genattr.data.official import (
    GalleryFeatures,
    TestCaseFeatures,
    load_gallery_pth,
    load_testcase_pth,
    save_gallery_pth,
    save_testcase_pth,
)

__all__ = [
    "BenchmarkManifest",
    "CustomizedModel",
    "GalleryFeatures",
    "TestCaseFeatures",
    "load_gallery_pth",
    "load_testcase_pth",
    "read_abc_json",
    "read_benchmark",
    "read_manifest",
    "save_gallery_pth",
    "save_testcase_pth",
    "write_abc_json",
    "write_manifest",
]
