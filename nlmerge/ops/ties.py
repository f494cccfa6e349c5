"""Fused TIES merging and task arithmetic over T stacked task vectors; task arithmetic over the
models themselves (``task_arithmetic_models``: the task vectors are formed as the kernel reads).

TIES (DESIGN.md, "Semantics"), per element with ``x_t`` the task vectors in fp32:
trim ``x_t`` to 0 where ``|x_t| < thr_t``; elect ``s = sign(sum_t w_t x_t)`` ("mass") or
``sign(sum_t sign(x_t))`` ("count"); zero signs take ``fill_sign``; keep the entries that agree
with ``s`` and merge them ("mean": weighted sum over summed weights, "sum", "max": largest
magnitude times ``s``); return ``base + lam * merged``. The fast kernels read every input element
once per pass and allocate only the output.

The zero-sign rule of TIES ("majority": the sign of the sum of all elected signs over the scope)
needs the whole scope before any element can be finished. One pass with ``fill_sign=0`` also
returns the scope's sign sum and how many elements were ambiguous (zero sign, some non-zero
trimmed entry); only when there are some, and the majority's fill would write something else
(``same_fill_result``), does a second pass with the majority sign follow.

Results are written in ``out_dtype`` (default: the base's dtype, else the task vectors'); a result
that is not finite there (an overflow: inputs are checked) raises ``NonFiniteResultError``. The
fast kernels count such results as they store them, so the check costs no extra read.
"""
from typing import NamedTuple

import torch

from nlmerge.ops._checks import (
    NonFiniteError,
    NonFiniteResultError,
    check_finite,
    check_float,
    check_out_dtype,
    check_finite_result,
    finite_scalar,
    flat_like,
    per_task,
    raise_counted,
    result_error,
    stack_task_vectors,
)
from nlmerge.ops._dispatch import resolve

SIGN_MODES = ("mass", "count")
DISJOINT_MODES = ("mean", "sum", "max")


class TiesPass(NamedTuple):
    """One TIES pass: the merged tensor, the sum of elected signs, the count of ambiguous elements,
    and whether the result overflowed its dtype (only ever True with ``check_result=False``)."""

    merged: torch.Tensor
    sign_sum: int
    ambiguous: int
    overflow: bool = False


def ties_reference(tv, thresholds, weights, base, lam, sign, disjoint, fill_sign, dtype):
    """The specification of one TIES pass on ``tv`` [T, N]; returns ``(out, sign_sum, ambiguous)``
    with ``out`` in ``dtype``."""
    x = tv.float()
    trimmed = torch.where(x.abs() >= thresholds[:, None], x, torch.zeros_like(x))
    election = torch.zeros_like(x[0])
    for t in range(x.shape[0]):  # fixed task order: the kernels add in this order too
        election = election + (weights[t] * trimmed[t] if sign == "mass" else torch.sign(trimmed[t]))
    s0 = torch.sign(election)
    sign_sum = int(s0.to(torch.int64).sum())
    ambiguous = int(((s0 == 0) & (trimmed != 0).any(dim=0)).sum())
    s = torch.where(s0 == 0, torch.full_like(s0, fill_sign), s0)
    agree = torch.where(s > 0, trimmed > 0, trimmed < 0)
    if disjoint == "max":
        merged = torch.where(agree, trimmed.abs(), torch.zeros_like(x)).amax(dim=0) * s
    else:
        num, den = torch.zeros_like(s), torch.zeros_like(s)
        for t in range(x.shape[0]):
            num = num + torch.where(agree[t], weights[t] * trimmed[t], torch.zeros_like(s))
            den = den + torch.where(agree[t], weights[t], torch.zeros_like(s))
        merged = num if disjoint == "sum" else torch.where(den != 0, num / den, torch.zeros_like(s))
    return _finish(merged, base, lam, dtype), sign_sum, ambiguous


def task_arithmetic_reference(tv, weights, base, lam, dtype):
    """The specification of task arithmetic on ``tv`` [T, N]: ``base + lam * sum_t w_t x_t`` in ``dtype``."""
    acc = torch.zeros(tv.shape[1], dtype=torch.float32, device=tv.device)
    for t in range(tv.shape[0]):
        acc = acc + weights[t] * tv[t].float()
    return _finish(acc, base, lam, dtype)


def result_dtype(data, base, out_dtype=None):
    """``out_dtype`` when given (checked), else the base's dtype when there is a base (it is the
    model), else the data's."""
    if check_out_dtype(out_dtype) is not None:
        return out_dtype
    return data.dtype if base is None else base.dtype


def _finish(merged, base, lam, dtype):
    """``base + lam * merged`` in fp32 (lam rounded to fp32 as the kernels do), in ``dtype``."""
    scaled = torch.tensor(lam, dtype=torch.float32, device=merged.device) * merged
    return (scaled if base is None else base.float() + scaled).to(dtype)


def ties_merge_pass(
    task_vectors,
    thresholds,
    *,
    fill_sign,
    sign="mass",
    disjoint="mean",
    weights=None,
    base=None,
    lam=1.0,
    out_dtype=None,
    out=None,
    check_result=True,
    backend=None,
):
    """One fused TIES pass with a given sign for elements whose elected sign is zero.

    Parameters
    ----------
    task_vectors : Tensor [T, *shape] or sequence of T tensors
    thresholds : sequence of T numbers or Tensor [T]
        Trim thresholds (``magnitude_threshold`` per task); ``|x_t| >= thr_t`` is kept.
    fill_sign : -1, 0 or 1
        Sign given to elements whose elected sign is zero.
    sign, disjoint, weights, base, lam, out_dtype, backend
        As in ``ties_merge``.
    out : Tensor, optional
        Where to write the result (contiguous, the result's shape and dtype), e.g. an earlier
        pass's ``merged`` when rerunning with the majority sign: no second buffer.
    check_result : bool
        Raise ``NonFiniteResultError`` when the result does not fit its dtype (True), or report
        it in ``overflow`` (False: for a caller that reruns the pass, e.g. with the majority sign,
        and checks the final one).

    Returns
    -------
    TiesPass
        ``merged`` (shape of one task vector, dtype as in ``ties_merge``), ``sign_sum`` (sum of the elected signs
        before filling), ``ambiguous`` (elements with zero elected sign and a non-zero
        trimmed entry: those whose result depends on ``fill_sign``) and ``overflow``.

    Raises
    ------
    NonFiniteError
        NaN/Inf in the task vectors or the base (naming which).
    NonFiniteResultError
        With ``check_result``: the result is not finite in its dtype.
    """
    if sign not in SIGN_MODES:
        raise ValueError(f"sign must be one of {SIGN_MODES}, got {sign!r}")
    if disjoint not in DISJOINT_MODES:
        raise ValueError(f"disjoint must be one of {DISJOINT_MODES}, got {disjoint!r}")
    if fill_sign not in (-1, 0, 1):
        raise ValueError(f"fill_sign must be -1, 0 or 1, got {fill_sign!r}")
    tv, shape = stack_task_vectors(task_vectors)
    num_tasks = tv.shape[0]
    thresholds = per_task(thresholds, num_tasks, "thresholds", tv.device, bound="nonnegative")
    weights = per_task(weights, num_tasks, "weights", tv.device, default=1.0, bound="positive")
    base = flat_like(base, "base", tv, shape)
    lam = finite_scalar(lam, "lam")
    checked = [("task_vectors", tv, True), ("base", base, False)]
    dtype = result_dtype(tv, base, out_dtype)
    if out is not None and (out.shape != shape or out.dtype != dtype or out.device != tv.device or not out.is_contiguous()):
        raise ValueError(f"out must be a contiguous {dtype} tensor of shape {shape} on {tv.device}")

    def reference(dt):
        return ties_reference(tv, thresholds, weights, base, lam, sign, disjoint, fill_sign, dt)

    _, kernels = resolve(backend, tv.device, "ties_merge")
    if kernels is None:
        check_finite(checked)
        merged, sign_sum, ambiguous = reference(dtype)
        overflow = not bool(torch.isfinite(merged).all())
        if out is None:
            out = merged.view(shape)
        else:
            out.copy_(merged.view(shape))
    else:
        flat = torch.empty(tv.shape[1], dtype=dtype, device=tv.device) if out is None else out.view(-1)
        sign_sum, ambiguous, nonfinite = kernels.ties_merge(tv, thresholds, weights, flat, base, lam, sign, disjoint, fill_sign)
        if nonfinite:
            check_finite(checked)  # a non-finite input raises here; else the result overflowed
        overflow, out = nonfinite > 0, flat.view(shape)
    if overflow and check_result:
        raise result_error(dtype, lambda: reference(torch.float32)[0])
    return TiesPass(out, sign_sum, ambiguous, overflow)


def ties_merge(
    task_vectors,
    thresholds,
    *,
    sign="mass",
    disjoint="mean",
    weights=None,
    base=None,
    lam=1.0,
    zero_sign="majority",
    out_dtype=None,
    backend=None,
):
    """Fused TIES merge of T task vectors of one tensor: trim, elect sign, disjoint merge.

    Parameters
    ----------
    task_vectors : Tensor [T, *shape] or sequence of T tensors
        fp32, fp16 or bf16 (one dtype); stacked when given as a sequence.
    thresholds : sequence of T numbers or Tensor [T]
        Per-task trim thresholds, e.g. ``magnitude_threshold(task_vectors[t], keep)``.
    sign : "mass" or "count"
        Elect ``sign(sum_t w_t * trimmed_t)`` or the sign of the count of signs.
    disjoint : "mean", "sum" or "max"
        How agreeing entries combine ("mean": weighted sum over summed weights).
    weights : None, number or sequence of T positive numbers
    base : Tensor, optional
        Added to the result (``base + lam * merged``); shape of one task vector, any float dtype.
    lam : float
        Scale of the merged task vector.
    zero_sign : "majority" or "positive"
        Sign for zero elections: the majority sign over this tensor (TIES), or + (mergekit).
    out_dtype : None, torch.float32, torch.float16 or torch.bfloat16
        Dtype of the result (default: the base's if given, else the task vectors').
    backend : None, "torch", "cpu" or "triton"

    Returns
    -------
    Tensor
        Shape of one task vector, in ``out_dtype`` (computed in fp32, rounded once).

    Raises
    ------
    NonFiniteError
        NaN/Inf in the task vectors or the base.
    NonFiniteResultError
        The result does not fit ``out_dtype`` (it would be Inf).
    """
    if zero_sign not in ("majority", "positive"):
        raise ValueError(f"zero_sign must be 'majority' or 'positive', got {zero_sign!r}")
    kwargs = dict(sign=sign, disjoint=disjoint, weights=weights, base=base, lam=lam, out_dtype=out_dtype, backend=backend)
    if zero_sign == "positive":
        return ties_merge_pass(task_vectors, thresholds, fill_sign=1, **kwargs).merged
    first = ties_merge_pass(task_vectors, thresholds, fill_sign=0, check_result=False, **kwargs)
    majority = (first.sign_sum > 0) - (first.sign_sum < 0)
    fill = 0 if first.ambiguous == 0 or same_fill_result(0, majority, disjoint) else majority
    if fill == 0 and not first.overflow:
        return first.merged
    # the majority's pass; or the first pass again, checked: its result overflowed, so this raises
    return ties_merge_pass(task_vectors, thresholds, fill_sign=fill, out=first.merged, **kwargs).merged


def same_fill_result(fill_a, fill_b, disjoint):
    """Whether TIES passes with these two ``fill_sign`` values write the same result.

    An element whose sign stays 0 merges its negative entries (the original ``where(s > 0, x > 0,
    x < 0)``), exactly as under fill -1, and "mean"/"sum" never multiply by the sign itself
    ("max" does): so fills 0 and -1 agree there, and a pass with fill 0 needs no majority rerun
    when the majority is -1.
    """
    return fill_a == fill_b or (disjoint != "max" and {fill_a, fill_b} <= {0, -1})


def task_arithmetic(task_vectors, *, weights=None, base=None, lam=1.0, out_dtype=None, backend=None):
    """Fused task arithmetic: ``base + lam * sum_t w_t * tau_t`` (``lam * sum`` without base).

    Parameters
    ----------
    task_vectors : Tensor [T, *shape] or sequence of T tensors
    weights : None, number or sequence of T finite numbers (negative allowed: task negation)
    base : Tensor, optional
    lam : float
        Finite.
    out_dtype : None, torch.float32, torch.float16 or torch.bfloat16
        Dtype of the result (default: the base's if given, else the task vectors').
    backend : None, "torch", "cpu" or "triton"

    Returns
    -------
    Tensor
        Shape of one task vector, in ``out_dtype``; accumulated in fp32 in task order.

    Raises
    ------
    NonFiniteError
        NaN/Inf in the task vectors or the base.
    NonFiniteResultError
        The result does not fit ``out_dtype`` (it would be Inf).
    """
    tv, shape = stack_task_vectors(task_vectors)
    weights = per_task(weights, tv.shape[0], "weights", tv.device, default=1.0)
    base = flat_like(base, "base", tv, shape)
    lam = finite_scalar(lam, "lam")
    dtype = result_dtype(tv, base, out_dtype)
    checked = [("task_vectors", tv, True), ("base", base, False)]

    def reference(dt):
        return task_arithmetic_reference(tv, weights, base, lam, dt)

    _, kernels = resolve(backend, tv.device, "task_arithmetic")
    if kernels is None:
        check_finite(checked)
        out = reference(dtype)
        check_finite_result(out, lambda: reference(torch.float32))
    else:
        out = torch.empty(tv.shape[1], dtype=dtype, device=tv.device)
        if kernels.task_arithmetic(tv, weights, out, base, lam):
            raise_counted(checked, dtype, lambda: reference(torch.float32))
    return out.view(shape)


def model_task_vectors(base, experts):
    """The fp32 task vectors ``[T, N]`` ``fp32(experts[t]) - fp32(base)`` of flat tensors (the
    rounding that ``task_arithmetic_models`` reproduces)."""
    ref = base.float()
    return torch.stack([x.float() - ref for x in experts])


def _first_nonfinite(base, experts):
    """NonFiniteError for the first of: the base, each expert, each task vector (an expert minus the
    base that overflows fp32) holding NaN/Inf; None when all are finite."""
    if not bool(torch.isfinite(base).all()):
        return NonFiniteError("base")
    for t, x in enumerate(experts):
        if not bool(torch.isfinite(x).all()):
            return NonFiniteError("experts", t)
    for t, x in enumerate(experts):
        if not bool(torch.isfinite(x.float() - base.float()).all()):
            return NonFiniteError("task_vectors", t)
    return None


def task_arithmetic_models(base, experts, *, weights=None, lam=1.0, out_dtype=None, backend=None):
    """Task arithmetic from the models: ``base + lam * sum_t w_t * (experts[t] - base)``.

    Bit-identical to ``task_arithmetic(fp32 task vectors, base=base, ...)`` with the task vectors
    ``fp32(experts[t]) - fp32(base)`` (each rounded to fp32), accumulated in fp32 in task order;
    the C++ kernel forms them in registers instead of writing and re-reading them (a third of the
    memory traffic for 16-bit models). Other backends ("torch", "triton" / CUDA tensors) build the
    fp32 task vectors on the device and run ``task_arithmetic`` on them, for now.

    Parameters
    ----------
    base : Tensor
        The base model's tensor (fp32, fp16 or bf16), any shape.
    experts : sequence of T tensors
        The experts' tensors: the base's shape and device. When their dtypes are not all the
        base's, every input is converted to fp32 first (the same values: conversions are exact).
    weights : None, number or sequence of T finite numbers (negative allowed: task negation)
    lam : float
        Finite.
    out_dtype : None, torch.float32, torch.float16 or torch.bfloat16
        Dtype of the result (default: the base's).
    backend : None, "torch", "cpu" or "triton"

    Returns
    -------
    Tensor
        The base's shape, in ``out_dtype``.

    Raises
    ------
    NonFiniteError
        NaN/Inf in the base (``tensor="base"``), in expert t (``"experts"``, ``task=t``), or a task
        vector that overflows fp32 (``"task_vectors"``, ``task=t``).
    NonFiniteResultError
        The result does not fit ``out_dtype`` (it would be Inf).
    """
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
    dtype = result_dtype(base, base, out_dtype)
    weights = per_task(weights, len(experts), "weights", base.device, default=1.0)
    lam = finite_scalar(lam, "lam")
    flat_base, flat = base.reshape(-1), [x.reshape(-1) for x in experts]
    if any(x.dtype != base.dtype for x in experts):  # models stored in different dtypes (rare)
        flat_base, flat = flat_base.float(), [x.float() for x in flat]

    name, kernels = resolve(backend, base.device, "task_arithmetic_models")
    if name != "cpu":
        try:
            out = task_arithmetic(
                model_task_vectors(flat_base, flat), weights=weights, base=flat_base, lam=lam, out_dtype=dtype, backend=name
            )
        except NonFiniteResultError:
            raise
        except NonFiniteError as err:  # name the model rather than its task vector
            raise (_first_nonfinite(flat_base, flat) or err) from None
        return out.view(base.shape)
    out = torch.empty(flat_base.shape[0], dtype=dtype)
    if kernels.task_arithmetic_models(flat_base, flat, weights, out, lam):
        err = _first_nonfinite(flat_base, flat)
        if err is not None:
            raise err
        tv = model_task_vectors(flat_base, flat)
        raise result_error(dtype, lambda: task_arithmetic_reference(tv, weights, flat_base, lam, torch.float32))
    return out.view(base.shape)
