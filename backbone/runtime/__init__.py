"""Plumbing shared by every training tool: config, distributed, checkpoints, logging, loaders."""

from backbone.runtime.checkpoint import (
    StopRequest,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
    unwrap_model,
)
from backbone.runtime.config import ConfigError, config_to_dict, dump_config, load_config
from backbone.runtime.dist import DistInfo, ResumableDistributedSampler, init_distributed, is_main_process
from backbone.runtime.errors import UserError
from backbone.runtime.loader import ResumableLoader, SeededSamples
from backbone.runtime.log import MetricsWriter, Progress, plot_curves, run_tool, setup_logging
from backbone.runtime.paths import resolve_data_path, shared_data_root

__all__ = [
    "ConfigError",
    "DistInfo",
    "MetricsWriter",
    "Progress",
    "ResumableDistributedSampler",
    "ResumableLoader",
    "SeededSamples",
    "StopRequest",
    "UserError",
    "capture_rng_state",
    "config_to_dict",
    "dump_config",
    "init_distributed",
    "is_main_process",
    "load_checkpoint",
    "load_config",
    "plot_curves",
    "resolve_data_path",
    "restore_rng_state",
    "run_tool",
    "save_checkpoint",
    "setup_logging",
    "shared_data_root",
    "unwrap_model",
]
