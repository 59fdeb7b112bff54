"""Where data comes from besides the main source: the field-name rule every `field_map` follows
(`check_fields`), and the prompts-only source of the unlabeled pool (`UnlabeledConfig`)."""

from __future__ import annotations

from pydantic import Field, field_validator, model_validator

from kd_core.config.base import StrictModel


def check_fields(v: dict[str, str], allowed: set[str]) -> dict[str, str]:
    """A field_map's keys are our field names: ValueError naming the unknown ones and the allowed ones."""
    bad = sorted(set(v) - allowed)
    if bad:
        raise ValueError(f"unknown field(s) {bad} (allowed: {', '.join(sorted(allowed))})")
    return v


class UnlabeledConfig(StrictModel):
    """A prompts-only source (a local file or a hub data set): prompts without responses, written by `prepare` as
    the unlabeled pool `data/unlabeled.jsonl` (decontaminated like the splits), which a transfer set with
    `prompts: unlabeled | both` has a model answer. A response column in the source is ignored."""

    path: str | None = None
    hub_name: str | None = None
    hub_split: str = "train"
    field_map: dict[str, str] | None = Field(
        None, description="our field -> source column (instruction, context, category); default: data.field_map")
    max_rows: int | None = Field(None, ge=1, description="keep the first N valid prompts")

    @field_validator("field_map")
    @classmethod
    def _known_fields(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        return None if v is None else check_fields(v, {"instruction", "context", "category"})

    @model_validator(mode="after")
    def _one_source(self) -> UnlabeledConfig:
        if (self.path is None) == (self.hub_name is None):
            raise ValueError("path: give exactly one of path (a local file) or hub_name (a hub data set)")
        return self
