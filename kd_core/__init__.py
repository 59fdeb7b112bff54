"""kd_core: knowledge distillation of autoregressive language models, one plain function per stage."""

from kd_core.env import apply_defaults

apply_defaults()

__version__ = "0.1.0"
