"""The base of every params section: unknown keys are errors (a typo must not fall back to a default), a value of
the wrong type is an error (strict: `"7"`, `7.0` or `true` for an integer, `"1e-3"` for a number and `"yes"` for a
boolean are refused, not converted; an integer is a valid number; .inf and .nan are not numbers here), and a
validated config is frozen."""

from typing import Any

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


# What the rules over several sections take (graph, methods, metrics, tokenizers, endpoint): a `PipelineConfig` /
# `StudentConfig` of kd_core.config.schema whose sections are valid. Named here, not imported: schema.py imports
# those modules, so they cannot import it back (no import circle, type-only imports included).
PipelineConfigLike = Any
StudentConfigLike = Any
