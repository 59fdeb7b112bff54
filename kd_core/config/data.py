"""The `data` section of `params.yaml`: where the rows come from, how they are checked and split, the named eval
sets and the unlabeled prompts (validated as in :mod:`kd_core.config.schema`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from kd_core.config.base import StrictModel
from kd_core.config.data_source import UnlabeledConfig, check_fields


class SplitConfig(StrictModel):
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    test_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    seed: int = 0

    @model_validator(mode="after")
    def _fractions(self) -> SplitConfig:
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError("val_fraction + test_fraction must be < 1")
        return self


class EvalSetConfig(StrictModel):
    """A named extra evaluation set read from a local file. Its `field_map` (our field -> source column; null:
    the main data's `data.field_map`) maps e.g. an `instruction / input / output` file with
    `{context: input, response: output}`; a list of strings in the response column is several references."""

    path: str
    limit: int | None = Field(None, ge=1, description="keep the first N valid rows")
    filter_field: str | None = Field(None, description="keep only rows whose field is true (a boolean; absent: false)")
    field_map: dict[str, str] | None = Field(None, description="our field -> source column (null: data.field_map)")

    @field_validator("field_map")
    @classmethod
    def _known_fields(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        return None if v is None else check_fields(v, {"instruction", "context", "response", "category"})


class DataConfig(StrictModel):
    source: Literal["builtin", "file", "hub"] = "builtin"
    builtin_examples: int = Field(3000, ge=10)
    builtin_unlabeled: int = Field(0, ge=0, description="source builtin: unlabeled prompts generated besides the "
                                   "labeled rows, disjoint from them and from the eval sets (data/unlabeled.jsonl)")
    builtin_seed: int = 0
    path: str | None = None
    hub_name: str | None = None
    hub_split: str = "train"
    field_map: dict[str, str] = Field(default_factory=dict, description="our field -> source column")
    max_chars: int = Field(4000, ge=16, description="rows whose prompt+response exceed this are bad")
    max_bad_fraction: float = Field(0.05, ge=0.0, le=1.0)
    split: SplitConfig = SplitConfig()
    template: Literal["alpaca", "minimal", "chatml"] = "alpaca"
    max_rows: int | None = Field(None, ge=1, description="keep the first N valid rows of the source (subsampling)")
    unlabeled: UnlabeledConfig | None = Field(None, description="prompts without responses from a file or the hub")
    eval_sets: dict[str, EvalSetConfig] = Field(default_factory=dict)

    @field_validator("field_map")
    @classmethod
    def _known_fields(cls, v: dict[str, str]) -> dict[str, str]:
        return check_fields(v, {"instruction", "context", "response", "category"})

    @model_validator(mode="after")
    def _source_args(self) -> DataConfig:
        if self.source == "file" and not self.path:
            raise ValueError("path: required when source is 'file'")
        if self.source == "hub" and not self.hub_name:
            raise ValueError("hub_name: required when source is 'hub'")
        if self.builtin_unlabeled and self.source != "builtin":
            raise ValueError(f"builtin_unlabeled: only with source 'builtin' (source is {self.source!r}; for "
                             f"prompts of your own: data.unlabeled: {{path: FILE}})")
        return self

    @property
    def has_unlabeled(self) -> bool:
        """Whether `prepare` writes a non-empty unlabeled pool source (built-in prompts or a prompts-only source)."""
        return bool(self.builtin_unlabeled) or self.unlabeled is not None


# -------------------------------------------------------------------------------- models (sources: model_source)
