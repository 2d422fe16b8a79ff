"""Configuration (being split into schema, loader and resume policy)."""

from mllmfl_dist.config.schema import *  # noqa: F401,F403
from mllmfl_dist.config.schema import (CHOICES, RESUMABLE_CHANGES, STRATEGY_SECTIONS, AlignConfig,  # noqa: F401
                                       AnnotateConfig, CheckpointConfig, Clip2flConfig, Config, CreffConfig,
                                       DataConfig, DeepSpeedConfig, DistConfig, EvalConfig, FederatedConfig,
                                       LogConfig, ModelConfig, PartitionConfig, PretrainConfig, RunConfig,
                                       config_from_dict, flat_items, resume_differences, validate)
