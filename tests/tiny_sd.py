"""A tiny Stable-Diffusion-shaped pipeline built from configs, with a tokenizer that works offline.

Same classes and layout as SD 1.x (UNet2DConditionModel with cross-attention, AutoencoderKL,
CLIPTextModel, a real CLIPTokenizer, DDPM-family scheduler), sizes cut down so that a Custom
Diffusion step takes milliseconds on a CPU. Weights are random; seeded, so reproducible.
"""

from __future__ import annotations

import inspect
import json
import string
from pathlib import Path


def char_vocab() -> dict[str, int]:
    """A character-level CLIP BPE vocabulary: every printable character, plain and word-final."""
    chars = sorted(set(string.ascii_lowercase + string.digits + string.punctuation))
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}


def build_tiny_pipeline(out: Path, seed: int = 0, sample_size: int = 16) -> Path:
    """Write a tiny SD-shaped pipeline to `out` (from_pretrained-loadable) and return `out`."""
    import torch
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # No merges: every word is spelled out character by character, which is all a test needs.
    if "vocab_file" in inspect.signature(CLIPTokenizer.__init__).parameters:  # transformers 4
        (out / "vocab.json").write_text(json.dumps(char_vocab()))
        (out / "merges.txt").write_text("#version: 0.2\n")
        tokenizer = CLIPTokenizer(
            str(out / "vocab.json"), str(out / "merges.txt"), model_max_length=77
        )
    else:
        tokenizer = CLIPTokenizer(vocab=char_vocab(), merges=[], model_max_length=77)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=sample_size * 2,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    return out
