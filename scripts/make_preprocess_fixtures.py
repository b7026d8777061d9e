"""Write the torchvision reference outputs that tests/test_features_preprocess.py checks against.

genattr preprocesses with PIL + numpy; the authors used torchvision transforms. This script runs
the torchvision pipelines, written here as the authors' `models/*.py` (and each model's own
release) define them, on a few real images from scikit-image and stores the results.

torchvision must never be a project dependency (it does not load beside the project's torch), so
run this in a throwaway virtualenv, from the repository root:

    python3.11 -m venv /tmp/tvenv
    /tmp/tvenv/bin/pip install torch==2.14.1 torchvision==0.29.1 scikit-image
    /tmp/tvenv/bin/python scripts/make_preprocess_fixtures.py

Storage, lossless and small: torchvision's output is `Normalize(ToTensor(crop))`, an elementwise
function of the uint8 crop, so per (geometry, image) we store the uint8 crop (H, W, 3) that
`ToTensor` saw, and per backbone a (3, 256) float32 table `lut[c, k]` = torchvision's output for
value k in channel c. `lut[c][crop[..., c]]` is checked here to be bit-identical to the full
torchvision output before anything is written.

The test imports `source_images()` from this file (it needs only numpy, PIL and scikit-image).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "preprocess"

# name -> (resize, interpolation, crop); resize is an int (shorter side) or an (h, w) pair.
GEOMETRIES: dict[str, tuple[int | tuple[int, int], str, int | None]] = {
    "s224-bicubic-c224": (224, "bicubic", 224),  # CLIP (clip.load's transform)
    "s256-bicubic-c224": (256, "bicubic", 224),  # DINO, DINOv2, EfficientNet-Lite0 (timm tf_)
    "s256-bilinear-c224": (256, "bilinear", 224),  # MoCo v3: Resize(256), default interpolation
    "s288-bilinear-c288": (288, "bilinear", 288),  # SSCD: Resize(288), CenterCrop(288)
    "s384-bilinear-c384": (384, "bilinear", 384),  # ViT-B/16-384: Resize(384), CenterCrop(384)
    "e32x32-bicubic": ((32, 32), "bicubic", None),  # pixel baseline
}
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
IDENTITY = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))

# backbone -> (geometry, (mean, std))
BACKBONES = {
    "clip-vit-b32": ("s224-bicubic-c224", CLIP),
    "dino-vitb16": ("s256-bicubic-c224", IMAGENET),
    "dinov2-vitb14": ("s256-bicubic-c224", IMAGENET),
    "efficientnet-lite0": ("s256-bicubic-c224", HALF),
    "moco-v3-vitb": ("s256-bilinear-c224", IMAGENET),
    "sscd-disc-mixup": ("s288-bilinear-c288", IMAGENET),
    "vit-b16-384": ("s384-bilinear-c384", HALF),
    "pixel": ("e32x32-bicubic", IDENTITY),
}


def source_images() -> dict[str, Image.Image]:
    """Real photos from scikit-image, chosen to exercise the awkward cases.

    chelsea cut to 449 px wide makes the resized long side odd for several sizes, so center
    crops start at x.5 offsets (torchvision rounds half to even); camera is grayscale and
    portrait; logo has an alpha channel.
    """
    import skimage.data

    return {
        "chelsea449": Image.fromarray(skimage.data.chelsea()[:, :449]),
        "camera_portrait": Image.fromarray(skimage.data.camera()[:, 105:406]),
        "logo_rgba": Image.fromarray(skimage.data.logo()),
    }


def _torchvision_pipeline(geometry: str, mean_std):
    from torchvision import transforms as T

    resize, interpolation, crop = GEOMETRIES[geometry]
    mode = {"bicubic": T.InterpolationMode.BICUBIC, "bilinear": T.InterpolationMode.BILINEAR}
    steps = [T.Resize(resize, interpolation=mode[interpolation])]
    if crop is not None:
        steps.append(T.CenterCrop(crop))
    head = T.Compose(steps)
    tail = T.Compose([T.ToTensor(), T.Normalize(*mean_std)])
    return head, tail


def main() -> int:
    import torch
    import torchvision

    images = {k: v.convert("RGB") for k, v in source_images().items()}
    arrays: dict[str, np.ndarray] = {}
    ramp = Image.fromarray(np.repeat(np.arange(256, dtype=np.uint8)[None, :, None], 3, axis=2))
    for backbone, (geometry, mean_std) in BACKBONES.items():
        head, tail = _torchvision_pipeline(geometry, mean_std)
        lut = tail(ramp).numpy()[:, 0, :].astype(np.float32)  # (3, 256)
        arrays[f"lut__{backbone}"] = lut
        for name, image in images.items():
            cropped = head(image)
            expected = tail(cropped).numpy()
            u8 = np.array(cropped)
            # The crop as ToTensor saw it must reproduce torchvision's output exactly.
            assert np.array_equal(
                torch.from_numpy(u8).permute(2, 0, 1).float().div(255).numpy(),
                _to_tensor(cropped),
            )
            decoded = np.stack([lut[c][u8[..., c]] for c in range(3)])
            assert decoded.dtype == np.float32 and np.array_equal(decoded, expected), backbone
            key = f"u8__{geometry}__{name}"
            if key in arrays:
                assert np.array_equal(arrays[key], u8)
            arrays[key] = u8
    OUT.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(OUT / "torchvision_reference.npz", **arrays)
    index = {
        "about": "torchvision reference outputs; written by scripts/make_preprocess_fixtures.py",
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "images": {k: [*v.size, v.mode] for k, v in source_images().items()},
        "geometries": {
            k: {"resize": r, "interpolation": i, "crop": c} for k, (r, i, c) in GEOMETRIES.items()
        },
        "backbones": {
            k: {"geometry": g, "mean": list(ms[0]), "std": list(ms[1])}
            for k, (g, ms) in BACKBONES.items()
        },
    }
    (OUT / "index.json").write_text(json.dumps(index, indent=2) + "\n")
    size = (OUT / "torchvision_reference.npz").stat().st_size
    print(f"wrote {len(arrays)} arrays, {size / 1e6:.2f} MB, to {OUT}")
    return 0


def _to_tensor(image: Image.Image) -> np.ndarray:
    from torchvision.transforms import functional as F

    return F.to_tensor(image).numpy()


if __name__ == "__main__":
    sys.exit(main())
