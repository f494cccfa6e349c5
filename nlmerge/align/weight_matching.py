"""Weight matching: Git Re-Basin coordinate descent over the permutations of a spec."""
import random

import torch

from nlmerge.align._assign import assignment_score, solve_assignment
from nlmerge.align.spec import check_int, check_permutation


def _moved(w, axis, n):
    return torch.movedim(w, axis, 0).reshape(n, -1)


def weight_matching(spec, reference, other, *, max_iter=100, seed=0, init=None, return_info=False):
    """Permutations of ``other`` that best match ``reference`` weight by weight.

    Coordinate descent (Git Re-Basin): each sweep visits the permutations in a random order; for
    permutation p the score is ``sum over (param, axis) of p`` of ``R @ O.T``, with R the
    reference's weight and O the other's weight with every other permuted axis already permuted
    (both with ``axis`` moved first and flattened to ``[n, -1]``); the linear assignment maximizes
    it. A permutation changes only when its score strictly improves; the descent stops after a
    sweep that improves nothing, or after ``max_iter`` sweeps.

    Parameters
    ----------
    spec : PermutationSpec
        Permutations and the (parameter, axis) pairs they act on.
    reference, other : Mapping[str, Tensor]
        State dicts with the same shapes on every parameter of the spec; read, never modified.
    max_iter : int
        Maximum number of sweeps, >= 1.
    seed : int
        Seed of the visiting order (any int).
    init : Mapping[str, Tensor], optional
        Starting permutations (default: identities).
    return_info : bool
        Also return ``{"sweeps": int, "converged": bool}``.

    Returns
    -------
    dict
        ``{perm_name: int64 tensor}`` (CPU), ``perms[p][i] = j``: unit i of the aligned model is
        unit j of ``other`` (new tensors). With ``return_info``, ``(perms, info)``.

    Raises
    ------
    ValueError
        The spec does not fit a state dict, shapes differ, ``max_iter`` < 1, or a bad ``init``.
    TypeError
        ``max_iter`` or ``seed`` not an int.
    """
    sizes = spec.validate(reference)
    if spec.validate(other) != sizes:
        raise ValueError("reference and other disagree on permutation sizes")
    for param in spec.params:
        if reference[param].shape != other[param].shape:
            raise ValueError(f"parameter {param!r}: shapes differ, {tuple(reference[param].shape)} "
                             f"vs {tuple(other[param].shape)}")
    max_iter = check_int(max_iter, "max_iter", 1)
    seed = check_int(seed, "seed")
    perms = {p: torch.arange(n) for p, n in sizes.items()}
    for p, value in dict(init or {}).items():
        if p not in perms:
            raise ValueError(f"init has a permutation not in the spec: {p!r}")
        perms[p] = check_permutation(p, value, sizes[p], spec.heads.get(p)).cpu().clone()  # never the caller's
    ref = {k: reference[k].detach().to(torch.float64) for k in spec.params}
    oth = {k: other[k].detach().to(torch.float64) for k in spec.params}
    rng = random.Random(seed)
    names = list(sizes)
    sweeps, converged = 0, False
    with torch.no_grad():
        while sweeps < max_iter:
            sweeps += 1
            improved = False
            for p in rng.sample(names, len(names)):
                n = sizes[p]
                score = None
                for param, axis in spec.perms[p]:
                    w = oth[param]
                    axis = axis % w.dim()
                    for q, other_axis in spec.params[param]:
                        other_axis %= w.dim()
                        if other_axis != axis:
                            w = w.index_select(other_axis, perms[q].to(w.device))
                    term = _moved(ref[param], axis, n) @ _moved(w, axis, n).T
                    score = term if score is None else score + term
                new = solve_assignment(score, spec.heads.get(p))
                old_value = assignment_score(score, perms[p])
                new_value = assignment_score(score, new)
                if new_value > old_value + 1e-12 * max(1.0, abs(old_value)):
                    perms[p] = new
                    improved = True
            if not improved:
                converged = True
                break
    return (perms, {"sweeps": sweeps, "converged": converged}) if return_info else perms
