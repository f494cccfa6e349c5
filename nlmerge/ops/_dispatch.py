"""Backend choice for every op (DESIGN.md, "Backends").

``backend=None`` means auto (or ``NLMERGE_BACKEND`` when set): CUDA tensors -> Triton, CPU
tensors -> the C++ extension when it is built, else the reference ``"torch"``. A backend asked
for by name that cannot run raises; auto falls back silently and logs its choice at debug level.
"""
import logging
import os
import warnings

from nlmerge import kernels

BACKENDS = ("torch", "cpu", "triton")
log = logging.getLogger("nlmerge")
_warned_no_cpu_kernels = False


def _interpreting():
    return os.environ.get("TRITON_INTERPRET") == "1"


def resolve(backend, device, op, *, triton_module="triton"):
    """Return ``(name, module)``: the backend to run ``op`` with on tensors on ``device``.

    ``module`` is the kernel module (None for the reference ``"torch"``). ``triton_module`` names
    the entry of ``kernels._MODULES`` that holds ``op``'s Triton kernels (a family with its own
    module: ``"triton_stats"``, ``"triton_permute"``); the C++ extension serves every family.
    """
    asked = backend if backend is not None else (os.environ.get("NLMERGE_BACKEND") or None)
    if asked is None or asked == "auto":
        name, module = _auto(device, triton_module)
        log.debug("nlmerge.ops.%s: auto backend %r on %s", op, name, device)
        return name, module
    if asked not in BACKENDS:
        source = "backend" if backend is not None else "NLMERGE_BACKEND"
        raise ValueError(f"{source}={asked!r} is not a backend; choose one of {BACKENDS} or None (auto)")
    if asked == "torch":
        return "torch", None
    if asked == "cpu" and device.type != "cpu":
        raise ValueError(f"backend 'cpu' runs on CPU tensors; {op} got tensors on {device}")
    if asked == "triton" and device.type != "cuda" and not _interpreting():
        raise ValueError(
            f"backend 'triton' needs CUDA tensors ({op} got {device}); on a CPU set "
            "TRITON_INTERPRET=1 to run the Triton kernels in Triton's interpreter"
        )
    module, reason = kernels.load(triton_module if asked == "triton" else asked)
    if module is None:
        raise RuntimeError(f"backend {asked!r} is not available: {reason}")
    return asked, module


def _auto(device, triton_module):
    global _warned_no_cpu_kernels
    if device.type == "cuda":
        module, _ = kernels.load(triton_module)
        return ("triton", module) if module is not None else ("torch", None)
    if device.type == "cpu":
        module, reason = kernels.load("cpu")
        if module is not None:
            return "cpu", module
        if not _warned_no_cpu_kernels:
            _warned_no_cpu_kernels = True
            warnings.warn(
                f"nlmerge: the C++ kernels are not built ({reason}); using the PyTorch reference "
                "(slower). Reinstall with a C++ compiler (`pip install -e .`) to build them.",
                RuntimeWarning,
                stacklevel=4,
            )
    return "torch", None
