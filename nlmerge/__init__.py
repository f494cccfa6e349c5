"""nlmerge: non-local model merging on fused kernels.

Layers (each imports only the ones above it): ``nlmerge.ops`` (tensor ops: references and
dispatch) -> ``nlmerge.kernels`` (fused C++ and Triton kernels, called only by ``ops``) ->
``nlmerge.align`` (permutation alignment), ``nlmerge.merge`` (state-dict merging) and
``nlmerge.correct`` (variance-collapse correction: TACT, REPAIR) -> ``nlmerge.io`` (checkpoints on
disk) -> ``nlmerge.jobs`` (the commands' engines: :func:`run_merge` is ``nlmerge merge``).
"""
from nlmerge import align, correct, merge, ops


def __getattr__(name):
    # the merge job needs safetensors and PyYAML: imported when first used, not with the package
    if name == "run_merge":
        from nlmerge.jobs import run_merge

        return run_merge
    raise AttributeError(f"module 'nlmerge' has no attribute {name!r}")


__version__ = "0.1.0"
__all__ = ["align", "correct", "merge", "ops", "run_merge", "__version__"]
