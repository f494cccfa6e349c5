"""TIES merging of state dicts (DESIGN.md, "Semantics"), in the TIES and mergekit conventions."""
import torch

from nlmerge import ops
from nlmerge.merge._common import (
    assemble,
    check_experts,
    check_running_stats,
    check_scalar,
    check_weights,
    make_plan,
    model_tensors,
    naming_nonfinite,
    running_stat_values,
)

SCOPES = ("global", "tensor")
SIGNS = ("mass", "count")
DISJOINTS = ("mean", "sum", "max")
CONVENTIONS = ("ties", "mergekit")


def check_ties_options(num_tasks, *, keep, scope, sign, disjoint, weights, convention):
    """Validate the TIES options; return ``(keep, scope, weights)`` with the scope resolved."""
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    if scope is None:
        scope = "global" if convention == "ties" else "tensor"
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    if convention == "mergekit" and scope != "tensor":
        raise ValueError('convention="mergekit" trims each tensor on its own: use scope="tensor" (or leave it unset)')
    if sign not in SIGNS:
        raise ValueError(f"sign must be one of {SIGNS}, got {sign!r}")
    if disjoint not in DISJOINTS:
        raise ValueError(f"disjoint must be one of {DISJOINTS}, got {disjoint!r}")
    keep = check_scalar(keep, "keep")
    if keep <= 0:
        raise ValueError(f"keep must be > 0 (the fraction of magnitudes kept), got {keep}")
    weights = check_weights(weights, num_tasks, bound="positive")
    return keep, scope, weights


def ties_vectors(
    keys, get_models, *, include_base, keep, lam, scope, sign, disjoint, weights, convention, backend, naming,
    out_dtype=None,
):
    """TIES over ``keys``; returns ``{key: base + lam * merged}`` (``include_base``) or ``{key: lam *
    merged}`` (the merged task vectors).

    ``get_models(key)`` gives a key's ``(base, experts)`` tensors in their storage dtypes (the
    ops form the task vectors as they read them: no fp32 copy of the models is ever held);
    ``naming(keys)`` is a context manager that names non-finite inputs and results; ``out_dtype``
    maps each key to its result's dtype (None: the base's dtype with ``include_base``, else fp32).
    Global scope streams over the keys: two histogram passes per task (the thresholds), then one
    merge pass per key with the majority sign so far (a sample's before any); the blocks of a key
    whose zero signs the final majority would fill otherwise are recomputed. Options are already
    checked.
    """
    out = {}
    common = dict(sign=sign, disjoint=disjoint, weights=weights, lam=lam, include_base=include_base, backend=backend)

    def dtype_of(key):
        if out_dtype is not None:
            return out_dtype[key]
        return None if include_base else torch.float32

    nonempty = []
    for key in keys:
        base, _ = get_models(key)
        if base.numel():
            nonempty.append(key)
        else:  # nothing to trim or merge in a tensor without elements
            out[key] = base.to(dtype_of(key) or base.dtype, copy=True)
    if scope == "tensor":  # one key at a time
        for key in nonempty:
            base, experts = get_models(key)
            with naming([key]):
                if convention == "mergekit":
                    n = base.numel()
                    rank = n - min(n, max(1, int(keep * n))) + 1
                    thresholds = ops.kth_smallest_magnitudes_models(base, experts, [rank] * len(experts), backend=backend)
                    out[key] = ops.ties_merge_models(base, experts, thresholds=thresholds,
                                                     zero_sign="positive", out_dtype=dtype_of(key), **common)
                else:
                    out[key] = ops.ties_merge_models(base, experts, keep=keep, zero_sign="majority",
                                                     out_dtype=dtype_of(key), **common)
        return out
    if not nonempty:
        return out
    thresholds = _global_thresholds(nonempty, get_models, keep, backend, naming)
    sign_sum, passes = 0, []
    for key in nonempty:
        # zero signs take the majority so far (before any: a sample's), the final one rarely
        # differs, so few blocks rerun; an overflow is judged on the final pass
        fill = ops.majority_sign(sign_sum) or "sample"
        base, experts = get_models(key)
        with naming([key]):
            first = ops.ties_merge_pass_models(
                base, experts, thresholds, fill_sign=fill, out_dtype=dtype_of(key), check_result=False, **common
            )
        out[key] = first.merged
        sign_sum += first.sign_sum
        passes.append((key, first))
    majority = ops.majority_sign(sign_sum)
    for key, first in passes:
        base, experts = get_models(key)
        with naming([key]):
            ops.complete_ties_pass(first, first.fill_sign, majority, disjoint, lambda **kw: ops.ties_merge_pass_models(
                base, experts, thresholds, out=first.merged, out_dtype=dtype_of(key), **common, **kw))
    return out


def _global_thresholds(keys, get_models, keep, backend, naming):
    """The per-task TIES thresholds over every element of ``keys`` (fp32 [T]): the exact k-th
    smallest task vector magnitude, ``k = d - int(d * keep)`` (0 where ``k < 1``), over the models'
    tensors taken together (``ops.magnitude_thresholds_models``: one read of them on the fast backends)."""
    models = [get_models(key) for key in keys]
    with naming(keys):
        return ops.magnitude_thresholds_models([base for base, _ in models],
                                               [[experts[t] for _, experts in models] for t in range(len(models[0][1]))],
                                               keep, backend=backend)


def ties(
    base,
    experts,
    *,
    keep=0.2,
    lam=1.0,
    scope=None,
    sign="mass",
    disjoint="mean",
    weights=None,
    convention="ties",
    exclude=(),
    running_stats="average",
    out_dtype=None,
    backend=None,
):
    """TIES merge: trim each task vector, elect signs, merge the agreeing entries.

    Parameters
    ----------
    base : Mapping[str, Tensor]
        The base state dict.
    experts : sequence of Mapping[str, Tensor]
        Expert state dicts with the base's keys, shapes and dtypes.
    keep : float
        Fraction of magnitudes kept per task (``>= 1`` keeps everything; must be > 0).
    lam : float
        Scale of the merged task vector: ``theta_base + lam * merged``.
    scope : None, "global" or "tensor"
        Trim threshold and zero-sign majority over all merged tensors of a task together
        ("global", the default of convention "ties") or per tensor ("tensor", the default and
        only choice of convention "mergekit").
    sign : "mass" or "count"
        Elect ``sign(sum_t w_t * trimmed_t)`` or the sign of the count of signs.
    disjoint : "mean", "sum" or "max"
        How the entries that agree with the elected sign combine ("mean": weighted mean).
    weights : sequence of float, optional
        One positive weight per expert.
    convention : "ties" or "mergekit"
        "ties": the original TIES code (keep ``int(d * keep) + 1`` magnitudes, zero signs take the
        majority sign). "mergekit": keep exactly ``max(1, int(n * keep))`` magnitudes per tensor
        (all ties at the threshold are kept), zero signs become +.
    exclude : str or sequence of str
        Glob patterns of keys copied from the base (as are integer/bool buffers).
    running_stats : "average" or "base"
        BatchNorm running statistics are not trimmed or merged (nor counted in a global
        threshold): the plain mean of the experts' values (default) or the base's values (see
        :mod:`nlmerge.merge`).
    out_dtype : None, torch.float32, torch.float16 or torch.bfloat16
        Dtype of every computed key (default: the base's dtype of the key).
    backend : None, "torch", "cpu" or "triton"
        Passed to ``nlmerge.ops``.

    Returns
    -------
    dict
        A new state dict in the base's key order.

    Raises
    ------
    ValueError
        Bad arguments, structural mismatches or NaN/Inf inputs (naming the key and the model);
        ``NonFiniteResultError`` (a ValueError) when a result does not fit its output dtype.
    """
    experts = check_experts(experts)
    keep, scope, weights = check_ties_options(
        len(experts), keep=keep, scope=scope, sign=sign, disjoint=disjoint, weights=weights, convention=convention
    )
    lam = check_scalar(lam, "lam")
    mode = check_running_stats(running_stats)
    plan = make_plan(base, experts, exclude, out_dtype=out_dtype)
    with torch.no_grad():
        stats = running_stat_values(plan, base, experts, mode, backend=backend)
        merged = ties_vectors(
            plan.merged,
            lambda key: model_tensors(key, base, experts),
            include_base=True,
            keep=keep,
            lam=lam,
            scope=scope,
            sign=sign,
            disjoint=disjoint,
            weights=weights,
            convention=convention,
            backend=backend,
            naming=lambda keys: naming_nonfinite(keys, base, experts),
            out_dtype=plan.out_dtype,
        )
    return assemble(plan, base, {**stats, **merged})
