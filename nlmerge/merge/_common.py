"""Shared plumbing of the state-dict merges: key plans, checks, task vectors, BatchNorm running
statistics, results and error naming (reusable by every merge method).

Every merge walks the base's keys in order. A floating tensor (fp32, fp16 or bf16) not matched by
an ``exclude`` pattern is *computed*: a BatchNorm running statistic (:func:`is_running_stat`) by
the running-statistics rule (:func:`running_stat_values`), every other such key by the merge method
(``Plan.merged``). Every other key (excluded, integer or bool buffers, non-tensor entries) is
*copied* from the base. Task vectors are computed in fp32; a computed key is rounded once to its
output dtype (``out_dtype``, default the base's dtype), and a value that does not fit it raises
``NonFiniteResultError`` naming the key (:func:`cast_result` for results computed in torch,
:func:`naming_nonfinite` around the ops, whose kernels count such values as they store them).
"""
import copy
import fnmatch
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from nlmerge import ops
from nlmerge.ops._checks import NonFiniteResultError, check_bound, check_out_dtype, layout_mismatch, result_error
from nlmerge.ops._checks import finite_scalar as check_scalar  # one definition of "a finite float"

MERGE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
COMPUTE_DTYPE = torch.float32
RUNNING_STAT_NAMES = ("running_mean", "running_var")
RUNNING_STATS_MODES = ("average", "base")


@dataclass(frozen=True)
class Plan:
    """Keys of a merge: ``keys`` (the base's order), ``merged`` (computed by the method),
    ``stats`` (BatchNorm running statistics, computed by :func:`running_stat_values`) and ``out_dtype``
    (the output dtype of every computed key)."""

    keys: list
    merged: list
    stats: list
    out_dtype: dict


def is_running_stat(key):
    """Whether ``key`` names a BatchNorm running statistic: its last dotted component is
    ``running_mean`` or ``running_var``. A state dict carries no module types, so the name decides
    (the names of ``torch.nn`` BatchNorm/InstanceNorm buffers)."""
    return key.rsplit(".", 1)[-1] in RUNNING_STAT_NAMES


def check_running_stats(mode):
    """The ``running_stats`` option: "average" or "base"."""
    if mode not in RUNNING_STATS_MODES:
        raise ValueError(f"running_stats must be one of {RUNNING_STATS_MODES}, got {mode!r}")
    return mode


def exclude_patterns(exclude):
    """Normalize ``exclude`` (one glob string or a sequence of them) to a tuple of strings."""
    if exclude is None:
        return ()
    if isinstance(exclude, str):
        return (exclude,)
    patterns = tuple(exclude)
    for p in patterns:
        if not isinstance(p, str):
            raise TypeError(f"exclude patterns must be strings, got {p!r}")
    return patterns


def is_excluded(key, patterns):
    """Whether ``key`` matches one of the glob ``patterns`` (``fnmatch.fnmatchcase``)."""
    return any(fnmatch.fnmatchcase(key, p) for p in patterns)


def check_experts(experts, what="experts"):
    """Return ``experts`` as a list of state dicts; refuse a lone mapping or an empty sequence."""
    if isinstance(experts, Mapping) or not isinstance(experts, Sequence) or isinstance(experts, str):
        raise TypeError(f"{what} must be a sequence of state dicts, got {type(experts).__name__}")
    experts = list(experts)
    if not experts:
        raise ValueError(f"{what} is empty: nothing to merge")
    for i, sd in enumerate(experts):
        if not isinstance(sd, Mapping):
            raise TypeError(f"{what}[{i}] must be a state dict (a mapping), got {type(sd).__name__}")
    return experts


def make_plan(base, experts, exclude, *, out_dtype=None, base_name="the base", item="expert", first_index=0):
    """Check every model against ``base`` and return the :class:`Plan`.

    Non-excluded tensor keys must exist in every model with the base's shape, dtype and device;
    keys a model has that the base lacks (and that are not excluded) are refused as well.
    ``out_dtype`` (None: each key's own dtype) is checked and recorded per computed key.
    ``item`` and ``first_index`` name the models in messages ("expert 2", "model 1").
    """
    if not isinstance(base, Mapping):
        raise TypeError(f"the base must be a state dict (a mapping), got {type(base).__name__}")
    check_out_dtype(out_dtype)
    patterns = exclude_patterns(exclude)
    keys, merged, stats, dtypes = list(base.keys()), [], [], {}
    for key in keys:
        if not isinstance(key, str):
            raise TypeError(f"state dict keys must be strings, got {key!r}")
        ref = base[key]
        if not isinstance(ref, torch.Tensor) or is_excluded(key, patterns):
            continue
        for i, sd in enumerate(experts, start=first_index):
            if key not in sd:
                raise ValueError(f"{item} {i} lacks key {key!r} that {base_name} has")
            x = sd[key]
            if not isinstance(x, torch.Tensor):
                raise ValueError(f"key {key!r}: {item} {i} holds a {type(x).__name__}, not a tensor")
            mismatch = layout_mismatch(x, ref)
            if mismatch:
                attr, a, b = mismatch
                raise ValueError(f"key {key!r}: {item} {i} has {attr} {a} but {base_name} has {b}")
        if ref.is_floating_point():
            if ref.dtype not in MERGE_DTYPES:
                raise ValueError(
                    f"key {key!r} has dtype {ref.dtype}; merges support float32, float16 and bfloat16 "
                    "(cast it, or exclude it to copy it from the base)"
                )
            (stats if is_running_stat(key) else merged).append(key)
            dtypes[key] = out_dtype or ref.dtype
        elif ref.is_complex():
            raise ValueError(f"key {key!r} has complex dtype {ref.dtype}; exclude it to copy it from the base")
    base_keys = set(keys)
    for i, sd in enumerate(experts, start=first_index):
        for key in sd.keys():
            if key not in base_keys and not (isinstance(key, str) and is_excluded(key, patterns)):
                raise ValueError(f"{item} {i} has key {key!r} that {base_name} lacks")
    return Plan(keys, merged, stats, dtypes)


def copy_value(value):
    """A copy of a copied (not merged) entry: a detached clone of a tensor, else a deep copy."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    return copy.deepcopy(value)


def assemble(plan, base, computed):
    """The result: a new dict in the base's key order, ``computed[key]`` (already in the plan's
    output dtype) for computed keys, copies of the base's entries elsewhere."""
    return {key: computed[key] if key in computed else copy_value(base[key]) for key in plan.keys}


def as_compute(x):
    """``x`` detached, in the compute dtype (fp32); no copy for fp32 tensors."""
    return x.detach().to(COMPUTE_DTYPE)


def tau(base_tensor, expert_tensor):
    """One task vector ``theta_t - theta_base`` in fp32 (a new tensor)."""
    return as_compute(expert_tensor) - as_compute(base_tensor)


def task_tensors(key, base, experts):
    """The T task vectors of ``key``: one fp32 tensor ``[T, *shape]`` (the ops take it as is)."""
    ref = base[key].detach()
    out = torch.empty((len(experts), *ref.shape), dtype=COMPUTE_DTYPE, device=ref.device)
    ref = as_compute(ref)
    for t, sd in enumerate(experts):
        x = sd[key].detach()
        if x.dtype == COMPUTE_DTYPE:
            torch.sub(x, ref, out=out[t])
        else:  # convert into the output row, then subtract in place: no fp32 temporary per expert
            out[t].copy_(x)
            out[t].sub_(ref)
    return out


def model_tensors(key, base, experts):
    """The base's and the experts' tensors of ``key``, detached, in their storage dtypes: what the
    ``nlmerge.ops`` ``*_models`` ops take (they form the task vectors as they read them)."""
    return base[key].detach(), [sd[key].detach() for sd in experts]


def check_weights(weights, num, *, bound=None, what="weights", per="expert"):
    """``None`` or a list of ``num`` finite floats, each within ``bound`` (None, "positive" or
    "nonnegative"; see ``nlmerge.ops._checks.check_bound``)."""
    if weights is None:
        return None
    if isinstance(weights, torch.Tensor):
        weights = weights.detach().reshape(-1).tolist()
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
        raise TypeError(f"{what} must be a sequence of {num} numbers, one per {per}")
    if len(weights) != num:
        raise ValueError(f"{what} has {len(weights)} entries for {num} {per}s")
    return [check_bound(check_scalar(w, f"{what}[{i}]"), f"{what}[{i}]", bound) for i, w in enumerate(weights)]


def check_lam(lam, num, name="lam", *, bound=None):
    """A finite float, or a list of ``num`` finite floats (one per task), within ``bound``."""
    if isinstance(lam, torch.Tensor):
        lam = lam.item() if lam.dim() == 0 else lam.detach().reshape(-1).tolist()
    if isinstance(lam, Sequence) and not isinstance(lam, (str, bytes)):
        return check_weights(lam, num, bound=bound, what=name, per="task")
    return check_bound(check_scalar(lam, name), name, bound)


def _nonfinite(x):
    return x.is_floating_point() and not bool(torch.isfinite(x).all())


def nonfinite_error(keys, base, experts, *, base_name="the base", item="expert", first_index=0, err=None):
    """A ValueError naming the first key (and model) among ``keys`` that holds NaN or Inf."""
    for key in keys:
        if _nonfinite(base[key]):
            return ValueError(f"key {key!r}: {base_name} contains NaN or Inf; non-finite values are never merged")
        for i, sd in enumerate(experts, start=first_index):
            if _nonfinite(sd[key]):
                return ValueError(f"key {key!r}: {item} {i} contains NaN or Inf; non-finite values are never merged")
        for i, sd in enumerate(experts, start=first_index):
            if _nonfinite(tau(base[key], sd[key])):
                return ValueError(f"key {key!r}: the task vector of {item} {i} (expert - base) overflows to Inf")
    where = ", ".join(repr(k) for k in keys[:4]) + (", ..." if len(keys) > 4 else "")
    return ValueError(f"non-finite values while merging key(s) {where}: {err}")


def _label(keys):
    return f"key {keys[0]!r}" if len(keys) == 1 else "keys " + ", ".join(repr(k) for k in keys)


@contextmanager
def naming_nonfinite(keys, base=None, experts=(), **names):
    """Re-raise the ops' non-finite errors naming the key(s): a result that does not fit its dtype
    as ``NonFiniteResultError`` (a ValueError), a NaN/Inf input as a ValueError that also names the
    model (when ``base`` and ``experts`` are given; ``names`` as in :func:`make_plan`)."""
    keys = list(keys)
    try:
        yield
    except NonFiniteResultError as err:
        raise NonFiniteResultError(_label(keys), err.dtype, err.fits) from err
    except ops.NonFiniteError as err:
        if base is None:
            raise ValueError(f"{_label(keys)}: {err}") from err
        raise nonfinite_error(keys, base, experts, err=err, **names) from err


def cast_result(key, result, dtype, *, label=None):
    """``result`` (an fp32 tensor computed for ``key`` from finite inputs) rounded once to ``dtype``,
    as a new tensor.

    Raises NonFiniteResultError naming ``label`` (default: the key) when a value does not fit
    ``dtype`` (it would be Inf), suggesting ``out_dtype=torch.float32`` when the fp32 result holds.
    """
    out = result.to(dtype, copy=True)
    if not bool(torch.isfinite(out).all()):
        raise result_error(dtype, lambda: result, label or f"key {key!r}")
    return out


def _check_stat(key, name, x):
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"key {key!r}: {name} contains NaN or Inf; non-finite values are never merged")
    if key.rsplit(".", 1)[-1] == "running_var" and bool((x < 0).any()):
        raise ValueError(
            f"key {key!r}: {name} holds a negative running variance ({float(x.min())}): not a BatchNorm state"
        )


def running_stat_values(
    plan, base, experts, mode, *, dtype=None, backend=None, base_name="the base", item="expert", first_index=0
):
    """The values of the plan's BatchNorm running statistics (``plan.stats``).

    Running statistics are not task vectors: no merge method touches them. ``mode="average"``
    gives the plain (unweighted) mean of the experts' values, so a merged variance is never
    negative; ``mode="base"`` gives the base's values. Either way they are estimates to refresh
    (REPAIR/TACT, or a pass over data). The values read must be finite, and running variances
    >= 0 (else ValueError naming the key and the model). Each value is in ``dtype`` (default: the
    plan's output dtype of its key); ``names`` as in :func:`make_plan`.
    """
    out = {}
    for key in plan.stats:
        if mode == "base":
            sources = [(base_name, base[key])]
        else:
            sources = [(f"{item} {i}", sd[key]) for i, sd in enumerate(experts, start=first_index)]
        for name, x in sources:
            _check_stat(key, name, x)
        with naming_nonfinite([key]):  # the mean rounded to a narrower out_dtype may not fit
            out[key] = ops.task_arithmetic(
                [x.detach() for _, x in sources],
                weights=[1.0 / len(sources)] * len(sources),  # scaled before summing: no overflow
                out_dtype=dtype or plan.out_dtype[key],
                backend=backend,
            )
    return out
