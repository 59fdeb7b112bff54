"""The base of every params section: unknown keys are errors (a typo must not fall back to a default),
and a validated config is frozen."""

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
