"""Argument checks shared by the ops: every bad input is refused with an error naming it."""
import math
from collections.abc import Sequence

import numpy as np
import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class NonFiniteError(ValueError):
    """A tensor holds NaN or ±Inf. ``tensor`` names the argument, ``task`` the task index (or None)."""

    def __init__(self, tensor, task=None):
        self.tensor, self.task = tensor, task
        label = tensor if task is None else f"{tensor}[{task}]"
        super().__init__(f"{label} contains NaN or Inf; non-finite values are never merged")


class NonFiniteResultError(NonFiniteError):
    """A merge of finite inputs has a result that is NaN/Inf in its output dtype (an overflow).

    ``tensor`` names the result (``"result"``, or a key), ``dtype`` the output dtype, ``fits`` a
    wider dtype that holds the result (``torch.float32``) or None when none does (the fp32
    computation overflows too).
    """

    def __init__(self, tensor, dtype, fits):
        self.tensor, self.task, self.dtype, self.fits = tensor, None, dtype, fits
        hint = f"pass out_dtype={fits}" if fits is not None else "it overflows float32 as well: scale the merge down"
        ValueError.__init__(self, f"{tensor}: the merged result does not fit {dtype} (it would be Inf); {hint}")


def result_error(dtype, fp32_result, tensor="result"):
    """The NonFiniteResultError of a result that is not finite in ``dtype``.

    ``fp32_result()`` computes the same result in fp32; it is called only here, on the error path,
    to tell whether ``out_dtype=torch.float32`` would hold it.
    """
    fits = None
    if dtype != torch.float32 and bool(torch.isfinite(fp32_result()).all()):
        fits = torch.float32
    return NonFiniteResultError(tensor, dtype, fits)


def check_finite_result(out, fp32_result):
    """Raise ``result_error`` when ``out`` holds NaN/Inf (the reference path's result check)."""
    if not bool(torch.isfinite(out).all()):
        raise result_error(out.dtype, fp32_result)


def raise_counted(tensors, dtype, fp32_result):
    """A merge kernel counted NaN/Inf among its inputs or results: raise NonFiniteError naming the
    first non-finite input, else the result's ``result_error`` (finite inputs: an overflow)."""
    check_finite(tensors)
    raise result_error(dtype, fp32_result)


def check_out_dtype(out_dtype, name="out_dtype"):
    """``None`` or one of the float dtypes results can be written in."""
    if out_dtype is not None and out_dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be None, torch.float32, torch.float16 or torch.bfloat16, got {out_dtype!r}")
    return out_dtype


def check_float(x, name):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} has dtype {x.dtype}; expected one of float32, float16, bfloat16")


def layout_mismatch(x, ref):
    """The first of shape, dtype and device where tensor ``x`` differs from ``ref``, as
    ``(what, x's, ref's)`` (shapes as tuples), or None."""
    for what in ("shape", "dtype", "device"):
        mine, theirs = getattr(x, what), getattr(ref, what)
        if mine != theirs:
            return (what, tuple(mine), tuple(theirs)) if what == "shape" else (what, mine, theirs)
    return None


def check_like(x, name, ref, ref_name):
    """``x`` must have ``ref``'s shape, dtype and device."""
    check_float(x, name)
    mismatch = layout_mismatch(x, ref)
    if mismatch:
        what, mine, theirs = mismatch
        raise ValueError(f"{name} has {what} {mine} but {ref_name} has {what} {theirs}")


def stack_task_vectors(task_vectors, name="task_vectors"):
    """Return ``(tv, shape)``: a contiguous ``[T, N]`` view of T task vectors and their shape.

    A ``[T, *shape]`` tensor is used as is (copied only when not contiguous); a sequence of T
    tensors of one shape, dtype and device is stacked.
    """
    if isinstance(task_vectors, torch.Tensor):
        check_float(task_vectors, name)
        if task_vectors.dim() < 1 or task_vectors.shape[0] < 1:
            raise ValueError(f"{name} must have a leading task axis of size >= 1, got shape {tuple(task_vectors.shape)}")
        shape = tuple(task_vectors.shape[1:])
        return task_vectors.reshape(task_vectors.shape[0], -1).contiguous(), shape
    if not isinstance(task_vectors, Sequence) or len(task_vectors) == 0:
        raise ValueError(f"{name} must be a tensor [T, ...] or a non-empty sequence of tensors")
    first = task_vectors[0]
    check_float(first, f"{name}[0]")
    for t, tau in enumerate(task_vectors[1:], start=1):
        check_like(tau, f"{name}[{t}]", first, f"{name}[0]")
    return torch.stack([tau.reshape(-1) for tau in task_vectors]), tuple(first.shape)


def flat_like(x, name, tv, shape, tv_name="task_vectors"):
    """Check an optional per-element tensor (base, tau_mtl) against the task vectors; flatten it.

    Its dtype may be any of the three float dtypes: a bf16 base plus fp32 task vectors is a
    bf16 model; the kernels convert each element to fp32 as they read it.
    """
    if x is None:
        return None
    check_float(x, name)
    if tuple(x.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(x.shape)} but each of {tv_name} has shape {shape}")
    if x.device != tv.device:
        raise ValueError(f"{name} is on {x.device} but {tv_name} is on {tv.device}")
    return x.reshape(-1).contiguous()


def finite_scalar(value, name):
    """``value`` as a finite float: TypeError naming ``name`` for what is not a real number (a str
    or a bool included: ``float`` would take them), ValueError for NaN/Inf."""
    try:
        if isinstance(value, (str, bytes, bool)):
            raise TypeError
        value = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real number, got {value!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def check_bound(value, name, bound):
    """``value`` (a float) against ``bound``: None, ``"positive"`` (> 0) or ``"nonnegative"`` (>= 0)."""
    if (bound == "positive" and value <= 0) or (bound == "nonnegative" and value < 0):
        raise ValueError(f"{name} must be {'positive (> 0)' if bound == 'positive' else 'non-negative (>= 0)'}, got {value}")
    return value


def per_task(values, num_tasks, name, device, *, default=None, bound=None):
    """A float32 tensor [T] from a scalar or a sequence of T finite numbers, each within ``bound``
    (see ``check_bound``)."""
    if values is None:
        values = default
    if isinstance(values, torch.Tensor):
        values = values.detach().reshape(-1).tolist()
    elif isinstance(values, np.ndarray):
        values = values.reshape(-1).tolist()
    if not isinstance(values, Sequence):
        values = [values] * num_tasks
    if len(values) != num_tasks:
        raise ValueError(f"{name} has {len(values)} entries for {num_tasks} task vectors")
    values = [check_bound(finite_scalar(v, f"{name}[{t}]"), f"{name}[{t}]", bound) for t, v in enumerate(values)]
    return torch.tensor(values, dtype=torch.float32, device=device)


def check_finite(tensors):
    """Raise NonFiniteError for the first of ``(name, tensor, has_task_axis)`` holding NaN/Inf."""
    for name, x, tasks in tensors:
        if x is None:
            continue
        if tasks:
            bad = (~torch.isfinite(x.reshape(x.shape[0], -1))).any(dim=1).nonzero()
            if bad.numel():
                raise NonFiniteError(name, int(bad[0]))
        elif not torch.isfinite(x).all():
            raise NonFiniteError(name)


def check_models(base, experts):
    """Check a base tensor and its T experts (float tensors, one shape and device); return them
    flat: ``(base [N], [expert [N], ...])``. When the experts' dtypes are not all the base's, all
    are converted to fp32 (the same values: the conversions are exact)."""
    check_float(base, "base")
    if isinstance(experts, torch.Tensor) or not isinstance(experts, (list, tuple)) or not experts:
        raise ValueError("experts must be a non-empty sequence of tensors (one per expert)")
    for t, x in enumerate(experts):
        check_float(x, f"experts[{t}]")
        if x.shape != base.shape or x.device != base.device:
            raise ValueError(
                f"experts[{t}] has shape {tuple(x.shape)} on {x.device} but the base has shape "
                f"{tuple(base.shape)} on {base.device}"
            )
    flat_base, flat = base.detach().reshape(-1), [x.detach().reshape(-1) for x in experts]
    if any(x.dtype != base.dtype for x in experts):  # models stored in different dtypes (rare)
        flat_base, flat = flat_base.float(), [x.float() for x in flat]
    return flat_base, flat


def model_task_vectors(base, experts):
    """The fp32 task vectors ``[T, N]`` ``fp32(experts[t]) - fp32(base)`` of flat tensors: what the
    models ops' task vectors are (each difference rounded to fp32)."""
    ref = base.float()
    return torch.stack([x.float() - ref for x in experts])


def first_nonfinite_model(base, experts, labels=None):
    """NonFiniteError for the first of: the base, each expert, each task vector (an expert minus the
    base that overflows fp32) holding NaN/Inf; None when all are finite. Expert t is named
    ``labels[t]`` (default ``experts[t]``; its task vector ``task_vectors[t]``)."""
    if not bool(torch.isfinite(base).all()):
        return NonFiniteError("base")
    for t, x in enumerate(experts):
        if not bool(torch.isfinite(x).all()):
            return NonFiniteError("experts", t) if labels is None else NonFiniteError(labels[t])
    for t, x in enumerate(experts):
        if not bool(torch.isfinite(x.float() - base.float()).all()):
            return NonFiniteError("task_vectors", t) if labels is None else NonFiniteError(f"{labels[t]} - base")
    return None


def raise_nonfinite_model(base, experts, labels=None):
    """A kernel counted non-finite values among the models' inputs: raise naming the first."""
    err = first_nonfinite_model(base, experts, labels)
    if err is None:
        raise AssertionError("a kernel counted non-finite model values that torch.isfinite does not see")
    raise err


def via_task_vectors(base, experts, op, task_vectors=model_task_vectors):
    """``op(task_vectors(base, experts))`` on the fp32 task vectors of flat models (the backends
    without a models kernel; ``task_vectors`` may drop entries, e.g. ``ops.dare.keep_task_vectors``),
    a non-finite input named as the model it comes from (base / experts[t] / task_vectors[t])."""
    try:
        return op(task_vectors(base, experts))
    except NonFiniteResultError:
        raise
    except NonFiniteError as err:
        raise (first_nonfinite_model(base, experts) or err) from None


def raise_nonfinite(tensors):
    """A kernel counted non-finite values in ``tensors``: raise naming the first such tensor."""
    check_finite(tensors)
    raise AssertionError("a kernel counted non-finite values that torch.isfinite does not see")
