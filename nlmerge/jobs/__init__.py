"""The commands' engines, on checkpoints on disk.

- :func:`run_merge` (``nlmerge merge CONFIG.yml OUT``): a mergekit config (config -> plan -> stream
  -> write); also over torch.distributed processes (:mod:`nlmerge.jobs.distributed`).
- :func:`plan_merge`: the same job planned and checked, reading no tensor.
- :func:`load_config`: a mergekit-style YAML config, validated.
- :mod:`nlmerge.jobs.align_job` (``nlmerge align``) and :mod:`nlmerge.jobs.correct_job`
  (``nlmerge correct``): alignment and correction of Hugging Face checkpoints.
- :mod:`nlmerge.jobs.tall_task` (``nlmerge tall-task``): one task's model from a TALL job's masks.
"""
from nlmerge.jobs.config import MergeConfig, load_config
from nlmerge.jobs.merge_job import MergePlan, plan_merge, run_merge
from nlmerge.jobs.methods import METHODS, ConfigError

__all__ = ["METHODS", "ConfigError", "MergeConfig", "MergePlan", "load_config", "plan_merge", "run_merge"]
