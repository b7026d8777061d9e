"""`IdentityVAE`: the pixel-space world model's stand-in for a VAE.

Pixels are the latents: `encode` returns the image as a deterministic latent distribution and
`decode` returns the latents. `block_out_channels` of length 1 gives the diffusers pipelines a
VAE scale factor of 1, and `scaling_factor` 1 leaves pixels in [-1, 1]. Saved pipelines name it
in `model_index.json` as `["genattr.world.vae", "IdentityVAE"]`, so `from_pretrained` (and so
`genattr.customize`) loads them. This module imports diffusers: import it only where needed.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
from diffusers.models.modeling_outputs import AutoencoderKLOutput
from diffusers.models.modeling_utils import ModelMixin


# diffusers' own models mix these two the same way; its ConfigMixin declares config_name None
# and ModelMixin a str, which mypy reports as a conflict between the bases.
class IdentityVAE(ModelMixin, ConfigMixin):  # type: ignore[misc]
    """The identity as a diffusers autoencoder (no weights besides a device anchor)."""

    @register_to_config
    def __init__(
        self,
        latent_channels: int = 3,
        block_out_channels: tuple[int, ...] = (3,),
        scaling_factor: float = 1.0,
        shift_factor: float | None = None,
        force_upcast: bool = False,
    ) -> None:
        super().__init__()
        # One buffer so that .device and .dtype work like any other model's.
        self.register_buffer("anchor", torch.zeros(1), persistent=True)

    def encode(self, x: torch.Tensor, return_dict: bool = True):
        params = torch.cat([x, torch.zeros_like(x)], dim=1)
        dist = DiagonalGaussianDistribution(params, deterministic=True)
        return AutoencoderKLOutput(latent_dist=dist) if return_dict else (dist,)

    def decode(self, z: torch.Tensor, return_dict: bool = True, generator=None):
        return DecoderOutput(sample=z) if return_dict else (z,)

    def forward(self, sample: torch.Tensor, return_dict: bool = True):
        return DecoderOutput(sample=sample) if return_dict else (sample,)
