"""The commands' engines: the merge job (config -> plan -> stream -> write).

- :func:`run_merge` (``nlmerge merge CONFIG.yml OUT``): a mergekit config on checkpoints on disk.
- :func:`plan_merge`: the same job planned and checked, reading no tensor.
- :func:`load_config`: a mergekit-style YAML config, validated.
"""
from nlmerge.jobs.config import MergeConfig, load_config
from nlmerge.jobs.merge_job import MergePlan, plan_merge, run_merge
from nlmerge.jobs.methods import METHODS, ConfigError

__all__ = ["METHODS", "ConfigError", "MergeConfig", "MergePlan", "load_config", "plan_merge", "run_merge"]
