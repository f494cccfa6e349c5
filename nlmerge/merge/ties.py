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
    naming_nonfinite,
    running_stat_values,
    task_tensors,
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
    keys, get_taus, get_base, *, keep, lam, scope, sign, disjoint, weights, convention, backend, naming, out_dtype=None
):
    """TIES over ``keys``; returns ``{key: base + lam * merged}``, or ``lam * merged`` without base.

    ``get_taus(key)`` gives the fp32 task vectors ``[T, *shape]`` of a key, ``get_base(key)`` its
    base (any float dtype; the kernels read it as fp32) or None; ``naming(keys)`` is a context
    manager that names non-finite inputs and results; ``out_dtype`` maps each key to its result's
    dtype (None: the base's dtype, else fp32). Options are already checked.
    """
    out = {}
    common = dict(sign=sign, disjoint=disjoint, weights=weights, lam=lam, backend=backend)

    def dtype_of(key):
        return None if out_dtype is None else out_dtype[key]

    def empty(key, taus):  # nothing to trim or merge in a tensor without elements
        base = get_base(key)
        value = taus[0] if base is None else base
        out[key] = value.to(dtype_of(key) or value.dtype, copy=True)

    if scope == "tensor":  # one key at a time: only its T task vectors are held
        for key in keys:
            taus = get_taus(key)
            if taus[0].numel() == 0:
                empty(key, taus)
                continue
            with naming([key]):
                if convention == "mergekit":
                    n = taus[0].numel()
                    rank = n - min(n, max(1, int(keep * n))) + 1
                    thresholds = [ops.kth_smallest_magnitude(x, rank, backend=backend) for x in taus]
                    zero_sign = "positive"
                else:
                    thresholds = [ops.magnitude_threshold(x, keep, backend=backend) for x in taus]
                    zero_sign = "majority"
                out[key] = ops.ties_merge(
                    taus, torch.stack(thresholds), base=get_base(key), zero_sign=zero_sign, out_dtype=dtype_of(key), **common
                )
        return out
    nonempty = []
    for key in keys:
        taus = get_taus(key)
        if taus[0].numel() == 0:
            empty(key, taus)
        else:
            nonempty.append((key, taus))
    if not nonempty:
        return out
    # scope="global": one threshold per task over every merged tensor, one majority sign
    num_tasks = len(nonempty[0][1])
    thresholds = []
    for t in range(num_tasks):
        with naming([key for key, _ in nonempty]):
            thresholds.append(ops.magnitude_threshold([taus[t] for _, taus in nonempty], keep, backend=backend))
    thresholds = torch.stack(thresholds)
    sign_sum, passes = 0, []
    for key, taus in nonempty:
        # zero signs take the majority so far: the final one rarely differs, so few tensors rerun;
        # an overflow is judged on the final pass
        fill = (sign_sum > 0) - (sign_sum < 0)
        with naming([key]):
            first = ops.ties_merge_pass(
                taus, thresholds, fill_sign=fill, base=get_base(key), out_dtype=dtype_of(key), check_result=False, **common
            )
        out[key] = first.merged
        sign_sum += first.sign_sum
        passes.append((key, taus, fill, first))
    majority = (sign_sum > 0) - (sign_sum < 0)
    for key, taus, fill, first in passes:
        final = majority if first.ambiguous and not ops.same_fill_result(fill, majority, disjoint) else fill
        if final != fill or first.overflow:  # the majority's pass; or, rerun checked, an overflow raises
            with naming([key]):
                ops.ties_merge_pass(
                    taus, thresholds, fill_sign=final, base=get_base(key), out_dtype=dtype_of(key), out=out[key], **common
                )
    return out


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
            lambda key: task_tensors(key, base, experts),
            lambda key: base[key].detach(),
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
