"""Attribution-by-Customization benchmarks: Custom Diffusion training, prompt sets, sampling and
the driver that makes whole benchmarks. Heavy libraries (torch, diffusers, ray) load only
inside the functions that use them."""

from genattr.customize.prompts import (
    MODIFIER_TOKEN,
    PromptSet,
    builtin_prompt_sets,
    indefinite_article,
    load_prompt_set,
    read_captions,
    with_article,
)
from genattr.customize.train import (
    CustomizeConfig,
    Customizer,
    customize,
    training_prompt,
)

__all__ = [
    "MODIFIER_TOKEN",
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
]
