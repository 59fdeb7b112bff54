"""Distillation methods, one module each, registered by name (see `base.py`).

Importing this package imports every module in it, so a new method is a new file and nothing else.
"""

from __future__ import annotations

import importlib
import pkgutil

from kd_core.methods.base import METHODS, LossOutput, Method, StepContext, get_method, register_method

for _mod in pkgutil.iter_modules(__path__):
    if _mod.name != "base":
        importlib.import_module(f"{__name__}.{_mod.name}")

__all__ = ["METHODS", "LossOutput", "Method", "StepContext", "get_method", "register_method"]
