"""The one configuration: `params.yaml`, validated with pydantic (`kd validate` checks it).

Every stage takes a `PipelineConfig`. Unknown keys are errors (a typo must not silently fall back to a
default), and every error names the file, the key path and the allowed values. Methods and divergences are
checked by name against light tables (`methods`: what each method needs and its `method_args` model;
`divergence_params`: the divergences and their parameters), so that validating imports no torch; the code behind
each name (`kd_core.methods`, `kd_core.losses.divergences`) is imported when a stage runs.

`schema`: the sections (`model_source`: how a model is made; `data_source`: field maps, the prompts-only
source); `load`: YAML, overrides, the credentials scan, error lines; `graph`: who teaches whom (order, cycles,
layer indices); `metrics`: which metrics the configured evaluation produces.
"""

from kd_core.config.data import DataConfig, EvalSetConfig, SplitConfig
from kd_core.config.data_source import UnlabeledConfig
from kd_core.config.load import find_secrets, load_config, parse_config
from kd_core.config.model_source import ArchConfig, ModelSource
from kd_core.config.schema import (ChampionRule, EvaluationConfig, FinetuneConfig, GenerationConfig, LoraConfig,
                                   OrchestrationConfig, PipelineConfig, StudentConfig, TeacherCacheConfig, TeacherConfig,
                                   TokenizerConfig, TrackingConfig, TrainingConfig, TransferSetConfig)
from kd_core.errors import ConfigError

__all__ = ["ArchConfig", "ChampionRule", "ConfigError", "DataConfig", "EvalSetConfig", "EvaluationConfig",
           "FinetuneConfig", "GenerationConfig", "LoraConfig", "ModelSource", "OrchestrationConfig", "PipelineConfig",
           "SplitConfig", "StudentConfig", "TeacherCacheConfig", "TeacherConfig", "TokenizerConfig", "TrackingConfig",
           "TrainingConfig", "TransferSetConfig", "UnlabeledConfig", "find_secrets", "load_config", "parse_config"]
