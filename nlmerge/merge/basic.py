"""Task vectors, weighted averaging and task arithmetic of state dicts."""
import torch

from nlmerge import ops
from nlmerge.merge._common import (
    assemble,
    cast_result,
    check_experts,
    check_running_stats,
    check_scalar,
    check_weights,
    make_plan,
    naming_nonfinite,
    nonfinite_error,
    running_stat_values,
    tau,
)


def task_vectors(base, experts, *, exclude=(), out_dtype=None):
    """Task vectors ``theta_t - theta_base`` of each expert.

    Parameters
    ----------
    base : Mapping[str, Tensor]
        The base state dict.
    experts : sequence of Mapping[str, Tensor]
        Expert state dicts with the base's keys, shapes and dtypes.
    exclude : str or sequence of str
        Glob patterns (``fnmatch``) of keys left out.
    out_dtype : None, torch.float32, torch.float16 or torch.bfloat16
        Dtype of every task vector (default: each key's own dtype).

    Returns
    -------
    list of dict
        One dict per expert, over the floating tensors not excluded except BatchNorm running
        statistics (they are not task vectors), in the base's key order; each difference is taken
        in fp32 and rounded once to ``out_dtype``.

    Raises
    ------
    ValueError
        Structural mismatches, or NaN/Inf in a model (naming the key and the model);
        ``NonFiniteResultError`` (a ValueError) when a difference does not fit ``out_dtype``.
    """
    experts = check_experts(experts)
    plan = make_plan(base, experts, exclude, out_dtype=out_dtype)
    out = [{} for _ in experts]
    with torch.no_grad():
        for key in plan.merged:
            for i, sd in enumerate(experts):
                diff = tau(base[key], sd[key])
                if not bool(torch.isfinite(diff).all()):
                    raise nonfinite_error([key], base, experts)
                out[i][key] = cast_result(key, diff, plan.out_dtype[key], label=f"key {key!r}, task vector of expert {i}")
    return out


def average(models, weights=None, *, exclude=(), running_stats="average", out_dtype=None, backend=None):
    """Weighted mean of state dicts: ``sum_i w_i theta_i / sum_i w_i``.

    Parameters
    ----------
    models : sequence of Mapping[str, Tensor]
        State dicts with one set of keys, shapes and dtypes.
    weights : sequence of float, optional
        One finite weight per model (equal weights by default); their sum must not be 0.
    exclude : str or sequence of str
        Glob patterns of keys copied from ``models[0]`` (as are integer/bool buffers).
    running_stats : "average" or "base"
        BatchNorm running statistics (keys ending in ``running_mean``/``running_var``): the plain
        mean of all models' values, the weights not applied (default: never a negative
        variance), or ``models[0]``'s values.
    out_dtype : None, torch.float32, torch.float16 or torch.bfloat16
        Dtype of every computed key (default: ``models[0]``'s dtype of the key).
    backend : None, "torch", "cpu" or "triton"
        Passed to ``nlmerge.ops``.

    Returns
    -------
    dict
        A new state dict in ``models[0]``'s key order (accumulated in fp32, rounded once).

    Raises
    ------
    ValueError
        Bad arguments, structural mismatches or NaN/Inf inputs (naming the key and the model);
        ``NonFiniteResultError`` (a ValueError) when a result does not fit its output dtype.
    """
    models = check_experts(models, "models")
    weights = check_weights(weights, len(models), what="weights", per="model")
    if weights is None:
        weights = [1.0] * len(models)
    total = sum(weights)
    if total == 0:
        raise ValueError(f"weights sum to 0: {weights}")
    weights = [w / total for w in weights]
    mode = check_running_stats(running_stats)
    ref = models[0]
    names = dict(base_name="model 0", item="model", first_index=1)
    plan = make_plan(ref, models[1:], exclude, out_dtype=out_dtype, **names)
    with torch.no_grad():
        merged = running_stat_values(plan, ref, models, mode, backend=backend, base_name="model 0", item="model")
        for key in plan.merged:
            with naming_nonfinite([key], ref, models[1:], **names):
                merged[key] = ops.task_arithmetic(
                    [sd[key].detach() for sd in models], weights=weights, out_dtype=plan.out_dtype[key], backend=backend
                )
    return assemble(plan, ref, merged)


def task_arithmetic(
    base, experts, *, lam=1.0, weights=None, exclude=(), running_stats="average", out_dtype=None, backend=None
):
    """Task arithmetic: ``theta_base + lam * sum_t w_t * tau_t``.

    Parameters
    ----------
    base : Mapping[str, Tensor]
        The base state dict.
    experts : sequence of Mapping[str, Tensor]
        Expert state dicts with the base's keys, shapes and dtypes.
    lam : float
        Scale of the summed task vectors (finite).
    weights : sequence of float, optional
        One finite weight per expert (negative: task negation); 1 by default.
    exclude : str or sequence of str
        Glob patterns of keys copied from the base (as are integer/bool buffers).
    running_stats : "average" or "base"
        BatchNorm running statistics: the plain mean of the experts' values (default; weights and
        lam not applied) or the base's values (see :mod:`nlmerge.merge`).
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
    weights = check_weights(weights, len(experts))
    lam = check_scalar(lam, "lam")
    mode = check_running_stats(running_stats)
    plan = make_plan(base, experts, exclude, out_dtype=out_dtype)
    with torch.no_grad():
        merged = running_stat_values(plan, base, experts, mode, backend=backend)
        for key in plan.merged:
            with naming_nonfinite([key], base, experts):
                merged[key] = ops.task_arithmetic_models(
                    base[key].detach(),
                    [sd[key].detach() for sd in experts],
                    weights=weights,
                    lam=lam,
                    out_dtype=plan.out_dtype[key],
                    backend=backend,
                )
    return assemble(plan, base, merged)
