"""nlmerge: non-local model merging on fused kernels.

Layers (each imports only the ones above it): ``nlmerge.ops`` (tensor ops: references and
dispatch) -> ``nlmerge.kernels`` (fused C++ and Triton kernels, called only by ``ops``) ->
``nlmerge.align`` (permutation alignment), ``nlmerge.merge`` (state-dict merging) and
``nlmerge.correct`` (variance-collapse correction: TACT, REPAIR) -> ``nlmerge.io`` (checkpoints on
disk) -> ``nlmerge.jobs`` (the commands' engines: :func:`run_merge` is ``nlmerge merge``).

The subpackages and modules are imported when first used (``nlmerge.merge``, ``from nlmerge import
ops``, ``nlmerge.io``), not with the package: the ``nlmerge`` command sets up the process (OpenMP's
wait policy) before torch loads. ``dir(nlmerge)`` lists them without importing them.
"""
import importlib
import pkgutil

# the public subpackages and modules, found on disk: listing them imports none
_SUBMODULES = frozenset(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"nlmerge.{name}")
    if name == "run_merge":  # the merge job (it needs safetensors and PyYAML)
        from nlmerge.jobs import run_merge

        return run_merge
    raise AttributeError(f"module 'nlmerge' has no attribute {name!r}")


def __dir__():
    return sorted({*__all__, *_SUBMODULES})


__version__ = "0.1.0"
__all__ = ["align", "correct", "merge", "ops", "run_merge", "__version__"]
