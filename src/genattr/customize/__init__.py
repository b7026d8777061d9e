"""Attribution-by-Customization benchmarks: Custom Diffusion training, prompt sets, sampling and
the driver that makes whole benchmarks. Heavy libraries (torch, diffusers, ray) load only
inside the functions that use them."""

from genattr.customize.config import Concept, CustomizeConfig, training_prompt
from genattr.customize.prompts import (
    MODIFIER_TOKEN,
    PromptSet,
    builtin_prompt_sets,
    indefinite_article,
    load_prompt_set,
    read_captions,
    with_article,
    with_token,
)
from genattr.customize.train import Customizer, customize

__all__ = [
    "MODIFIER_TOKEN",
    "Concept",
    "CustomizeConfig",
    "Customizer",
    "PromptSet",
    "builtin_prompt_sets",
    "customize",
    "indefinite_article",
    "load_prompt_set",
    "read_captions",
    "training_prompt",
    "with_article",
    "with_token",
]
