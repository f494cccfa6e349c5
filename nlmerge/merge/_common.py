"""Shared plumbing of the state-dict merges: key plans, checks, task vectors, error naming.

Every merge walks the base's keys in order. A key is *merged* when its value is a floating tensor
(fp32, fp16 or bf16) not matched by an ``exclude`` pattern; every other key (excluded, integer or
bool buffers, non-tensor entries) is *copied* from the base. Task vectors are computed in fp32
(exact differences for fp16/bf16 models; results are rounded once to the base's dtype).
"""
import copy
import fnmatch
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from nlmerge import ops
from nlmerge.ops._checks import finite_scalar as check_scalar  # one definition of "a finite float"
from nlmerge.ops._checks import layout_mismatch

MERGE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
COMPUTE_DTYPE = torch.float32


@dataclass(frozen=True)
class Plan:
    """Keys of a merge: ``keys`` (the base's order), ``merged`` (floating, not excluded)."""

    keys: list
    merged: list


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


def make_plan(base, experts, exclude, *, base_name="the base", item="expert", first_index=0):
    """Check every model against ``base`` and return the :class:`Plan`.

    Non-excluded tensor keys must exist in every model with the base's shape, dtype and device;
    keys a model has that the base lacks (and that are not excluded) are refused as well.
    ``item`` and ``first_index`` name the models in messages ("expert 2", "model 1").
    """
    if not isinstance(base, Mapping):
        raise TypeError(f"the base must be a state dict (a mapping), got {type(base).__name__}")
    patterns = exclude_patterns(exclude)
    keys, merged = list(base.keys()), []
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
            merged.append(key)
        elif ref.is_complex():
            raise ValueError(f"key {key!r} has complex dtype {ref.dtype}; exclude it to copy it from the base")
    base_keys = set(keys)
    for i, sd in enumerate(experts, start=first_index):
        for key in sd.keys():
            if key not in base_keys and not (isinstance(key, str) and is_excluded(key, patterns)):
                raise ValueError(f"{item} {i} has key {key!r} that {base_name} lacks")
    return Plan(keys, merged)


def copy_value(value):
    """A copy of a copied (not merged) entry: a detached clone of a tensor, else a deep copy."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    return copy.deepcopy(value)


def assemble(plan, base, merged):
    """The result: a new dict in the base's key order, merged tensors in the base's dtypes."""
    out = {}
    for key in plan.keys:
        if key in merged:
            out[key] = merged[key].to(base[key].dtype)
        else:
            out[key] = copy_value(base[key])
    return out


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
        torch.sub(as_compute(sd[key]), ref, out=out[t])
    return out


def check_weights(weights, num, *, positive=False, what="weights", per="expert"):
    """``None`` or a list of ``num`` finite floats (all > 0 when ``positive``)."""
    if weights is None:
        return None
    if isinstance(weights, torch.Tensor):
        weights = weights.detach().reshape(-1).tolist()
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
        raise TypeError(f"{what} must be a sequence of {num} numbers, one per {per}")
    if len(weights) != num:
        raise ValueError(f"{what} has {len(weights)} entries for {num} {per}s")
    weights = [check_scalar(w, f"{what}[{i}]") for i, w in enumerate(weights)]
    if positive:
        bad = [i for i, w in enumerate(weights) if w <= 0]
        if bad:
            raise ValueError(f"{what} must all be positive; {what}[{bad[0]}] = {weights[bad[0]]}")
    return weights


def check_lam(lam, num, name="lam"):
    """A finite float, or a list of ``num`` finite floats (one per task)."""
    if isinstance(lam, torch.Tensor):
        lam = lam.item() if lam.dim() == 0 else lam.detach().reshape(-1).tolist()
    if isinstance(lam, Sequence) and not isinstance(lam, (str, bytes)):
        return check_weights(lam, num, what=name, per="task")
    return check_scalar(lam, name)


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


@contextmanager
def naming_nonfinite(keys, base, experts, **names):
    """Re-raise ``ops.NonFiniteError`` as a ValueError naming the key and the model."""
    try:
        yield
    except ops.NonFiniteError as err:
        raise nonfinite_error(list(keys), base, experts, err=err, **names) from err
