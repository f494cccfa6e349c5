"""Fused kernels. Only ``nlmerge.ops`` calls them; each backend module follows CONTRACT.md.

``load(name)`` imports a backend module on first use: the C++ extension (``"cpu"``) is a cheap
import, Triton (``"triton"``) is not, so neither is imported before an op asks for it.
"""
import importlib

_MODULES = {
    "cpu": "nlmerge.kernels.cpu",  # the C++ extension: every family
    "triton": "nlmerge.kernels.triton_merge",  # selection, TIES, task arithmetic, TALL, consensus
    "triton_stats": "nlmerge.kernels.triton_stats",  # streaming statistics
    "triton_permute": "nlmerge.kernels.triton_permute",  # batched permutation gathers
}
_loaded = {}


def load(name):
    """Return ``(module, None)`` for an importable kernel module, else ``(None, reason)``.

    ``name`` is a backend ("cpu", "triton") or a Triton family module ("triton_stats", ...):
    ops first resolve the backend, then load their family's module when it has its own.
    """
    if name not in _loaded:
        try:
            module = importlib.import_module(_MODULES[name])
            reason = None if getattr(module, "available", True) else module.load_error
        except Exception as exc:  # a missing package, a failed build, a broken install
            module, reason = None, f"{type(exc).__name__}: {exc}"
        _loaded[name] = (module if reason is None else None, reason)
    return _loaded[name]
