"""Configuration: the schema (:mod:`.schema`, with each field's choices and bounds, :mod:`.fields`), reading
it (:mod:`.loader`), and what a resumed stage may find changed (:mod:`.resume`)."""

from mllmfl_dist.config.loader import config_from_dict, flat_items, load_config, validate
from mllmfl_dist.config.resume import resume_differences
from mllmfl_dist.config.schema import (
    CAPTION_PROMPT,
    CLASS_QUESTION_PROMPT,
    AlignConfig,
    AnnotateConfig,
    CheckpointConfig,
    Config,
    DataConfig,
    DeepSpeedConfig,
    DistConfig,
    EvalConfig,
    FederatedConfig,
    LogConfig,
    ModelConfig,
    PartitionConfig,
    PretrainConfig,
    RunConfig,
)
from mllmfl_dist.config.values import parse_index_range
from mllmfl_dist.core.errors import ConfigError

__all__ = [
    "CAPTION_PROMPT",
    "CLASS_QUESTION_PROMPT",
    "AlignConfig",
    "AnnotateConfig",
    "CheckpointConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "DeepSpeedConfig",
    "DistConfig",
    "EvalConfig",
    "FederatedConfig",
    "LogConfig",
    "ModelConfig",
    "PartitionConfig",
    "PretrainConfig",
    "RunConfig",
    "config_from_dict",
    "flat_items",
    "load_config",
    "parse_index_range",
    "resume_differences",
    "validate",
]
