"""Task vectors, weighted averaging and task arithmetic of state dicts."""
import torch

from nlmerge import ops
from nlmerge.merge._common import (
    assemble,
    check_experts,
    check_scalar,
    check_weights,
    make_plan,
    naming_nonfinite,
    task_tensors,
)


def task_vectors(base, experts, *, exclude=()):
    """Task vectors ``theta_t - theta_base`` of each expert.

    Parameters
    ----------
    base : Mapping[str, Tensor]
        The base state dict.
    experts : sequence of Mapping[str, Tensor]
        Expert state dicts with the base's keys, shapes and dtypes.
    exclude : str or sequence of str
        Glob patterns (``fnmatch``) of keys left out.

    Returns
    -------
    list of dict
        One dict per expert, over the floating tensors not excluded, in the base's key order and
        dtypes (the difference is taken in the tensors' own dtype).
    """
    experts = check_experts(experts)
    plan = make_plan(base, experts, exclude)
    with torch.no_grad():
        return [{key: sd[key].detach() - base[key].detach() for key in plan.merged} for sd in experts]


def average(models, weights=None, *, exclude=(), backend=None):
    """Weighted mean of state dicts: ``sum_i w_i theta_i / sum_i w_i``.

    Parameters
    ----------
    models : sequence of Mapping[str, Tensor]
        State dicts with one set of keys, shapes and dtypes.
    weights : sequence of float, optional
        One finite weight per model (equal weights by default); their sum must not be 0.
    exclude : str or sequence of str
        Glob patterns of keys copied from ``models[0]`` (as are integer/bool buffers).
    backend : None, "torch", "cpu" or "triton"
        Passed to ``nlmerge.ops``.

    Returns
    -------
    dict
        A new state dict in ``models[0]``'s key order and dtypes (accumulated in fp32).
    """
    models = check_experts(models, "models")
    weights = check_weights(weights, len(models), what="weights", per="model")
    if weights is None:
        weights = [1.0] * len(models)
    total = sum(weights)
    if total == 0:
        raise ValueError(f"weights sum to 0: {weights}")
    weights = [w / total for w in weights]
    ref = models[0]
    names = dict(base_name="model 0", item="model", first_index=1)
    plan = make_plan(ref, models[1:], exclude, **names)
    merged = {}
    with torch.no_grad():
        for key in plan.merged:
            with naming_nonfinite([key], ref, models[1:], **names):
                merged[key] = ops.task_arithmetic(
                    [sd[key].detach() for sd in models], weights=weights, backend=backend
                )
    return assemble(plan, ref, merged)


def task_arithmetic(base, experts, *, lam=1.0, weights=None, exclude=(), backend=None):
    """Task arithmetic: ``theta_base + lam * sum_t w_t * tau_t``.

    Parameters
    ----------
    base : Mapping[str, Tensor]
        The base state dict.
    experts : sequence of Mapping[str, Tensor]
        Expert state dicts with the base's keys, shapes and dtypes.
    lam : float
        Scale of the summed task vectors.
    weights : sequence of float, optional
        One finite weight per expert (negative: task negation); 1 by default.
    exclude : str or sequence of str
        Glob patterns of keys copied from the base (as are integer/bool buffers).
    backend : None, "torch", "cpu" or "triton"
        Passed to ``nlmerge.ops``.

    Returns
    -------
    dict
        A new state dict in the base's key order and dtypes.
    """
    experts = check_experts(experts)
    weights = check_weights(weights, len(experts))
    lam = check_scalar(lam, "lam")
    plan = make_plan(base, experts, exclude)
    merged = {}
    with torch.no_grad():
        for key in plan.merged:
            with naming_nonfinite([key], base, experts):
                merged[key] = ops.task_arithmetic(
                    task_tensors(key, base, experts),
                    weights=weights,
                    base=base[key].detach(),
                    lam=lam,
                    backend=backend,
                )
    return assemble(plan, base, merged)
