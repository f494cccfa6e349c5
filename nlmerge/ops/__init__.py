"""Tensor-level ops of nlmerge, one module per family; each holds its reference and dispatch.

- ``selection``: exact magnitude selection (the TIES threshold) by radix histograms;
  ``streaming_selection``: the same over tensors that arrive one at a time (the merge job).
- ``ties``: fused TIES passes and task arithmetic over stacked task vectors, and the same over
  the models (``*_models``: the task vectors formed in the kernel, never stored).
- ``tall``: TALL masks (bit-packed), consensus, rebuilding a task from its mask.
- ``stats``: streaming activation statistics (means, variances, covariance, cross-correlation).
- ``random``: counter-based random draws (Philox4x32-10) keyed by (seed, name, index): DARE.
- ``dare``: DARE's random keep over the models (``RandomKeep``, the ``random_keep=`` of the
  models merge ops) and the L1 norms of its rescale, in a defined summation order.
- ``permute``: batched permutation gathers (applying an alignment's permutations).
- ``activations``: feeding batches to a model and hooked activations and their feature axis
  (shared by alignment and correction).

Every op takes ``backend=None | "torch" | "cpu" | "triton"`` (see ``_dispatch``).
"""
from nlmerge.ops._checks import NonFiniteError
from nlmerge.ops.dare import RandomKeep, keep_l1_norms_models, keep_task_vectors
from nlmerge.ops.permute import permute_tensors
from nlmerge.ops.random import keep_mask, random_bits, uniform
from nlmerge.ops.selection import (
    kth_smallest_magnitude,
    kth_smallest_magnitude_models,
    kth_smallest_magnitudes_models,
    magnitude_threshold,
    magnitude_threshold_models,
    magnitude_thresholds_models,
)
from nlmerge.ops.stats import StreamingStats
from nlmerge.ops.streaming_selection import MagnitudeSelector, kth_smallest_magnitudes_streaming
from nlmerge.ops.tall import (
    apply_mask,
    consensus_merge,
    consensus_merge_models,
    pack_masks,
    packed_size,
    tall_masks,
    tall_masks_models,
    unpack_masks,
)
from nlmerge.ops.ties import (
    TiesPass,
    complete_ties_pass,
    majority_sign,
    same_fill_result,
    task_arithmetic,
    task_arithmetic_models,
    ties_merge,
    ties_merge_models,
    ties_merge_pass,
    ties_merge_pass_models,
)

__all__ = [
    "MagnitudeSelector",
    "NonFiniteError",
    "RandomKeep",
    "StreamingStats",
    "TiesPass",
    "apply_mask",
    "complete_ties_pass",
    "consensus_merge",
    "consensus_merge_models",
    "keep_l1_norms_models",
    "keep_mask",
    "keep_task_vectors",
    "kth_smallest_magnitude",
    "kth_smallest_magnitude_models",
    "kth_smallest_magnitudes_models",
    "kth_smallest_magnitudes_streaming",
    "magnitude_threshold",
    "magnitude_threshold_models",
    "magnitude_thresholds_models",
    "majority_sign",
    "pack_masks",
    "packed_size",
    "permute_tensors",
    "random_bits",
    "same_fill_result",
    "tall_masks",
    "tall_masks_models",
    "task_arithmetic",
    "task_arithmetic_models",
    "ties_merge",
    "ties_merge_models",
    "ties_merge_pass",
    "ties_merge_pass_models",
    "uniform",
    "unpack_masks",
]
