"""Weight matching: Git Re-Basin coordinate descent over the permutations of a spec."""
import random

import torch

from nlmerge.align._assign import assignment_score, solve_assignment, solve_group
from nlmerge.align.spec import check_group, check_int, check_permutation


def _moved(w, axis, n):
    return torch.movedim(w, axis, 0).reshape(n, -1)


def _meta(model, keys, label):
    """``{key: meta tensor}`` of ``model``'s shapes and dtypes, from ``model.info(key)`` when the
    mapping has it (a lazy checkpoint: nothing is read), else from the tensors."""
    info = getattr(model, "info", None)
    out = {}
    for key in keys:
        if key not in model:
            raise ValueError(f"parameter {key!r} of the spec is not in {label}")
        entry = info(key) if callable(info) else model[key]
        out[key] = torch.empty(tuple(entry.shape), dtype=entry.dtype, device="meta")
    return out


class _Descent:
    """The state of one weight matching: reads each tensor when a score needs it, in fp32."""

    def __init__(self, spec, reference, other, sizes):
        self.spec, self.reference, self.other, self.sizes = spec, reference, other, sizes

    def read(self, model, key):
        return model[key].detach().to(torch.float32)

    def permuted_other(self, param, perms, skip_axis=None):
        """``other[param]`` with every permuted axis but ``skip_axis`` permuted."""
        w = self.read(self.other, param)
        for q, axis in self.spec.params[param]:
            axis %= w.dim()
            if axis != skip_axis and q in perms:
                w = w.index_select(axis, perms[q].to(w.device))
        return w

    def score(self, p, perms):
        """``[n, n]`` float64: sum over the (param, axis) pairs of ``p`` of ``R @ O.T`` (axis first,
        flattened; O with its other axes permuted)."""
        n, score = self.sizes[p], None
        for param, axis in self.spec.perms[p]:
            r = self.read(self.reference, param)
            axis %= r.dim()
            term = (_moved(r, axis, n) @ _moved(self.permuted_other(param, perms, axis), axis, n).T).double()
            score = term if score is None else score + term
        return score.cpu()

    def objective(self, perms):
        """``sum over the spec's parameters of <reference, permuted other>`` (float64)."""
        return sum(float(torch.sum(self.read(self.reference, k) * self.permuted_other(k, perms),
                                   dtype=torch.float64)) for k in self.spec.params)


def weight_matching(spec, reference, other, *, max_iter=100, seed=0, init=None, restarts=1, return_info=False):
    """Permutations of ``other`` that best match ``reference`` weight by weight.

    Coordinate descent (Git Re-Basin): each sweep visits the permutations in a random order; for
    permutation p the score is ``sum over (param, axis) of p`` of ``R @ O.T``, with R the
    reference's weight and O the other's weight with every other permuted axis already permuted
    (both with ``axis`` moved first and flattened to ``[n, -1]``, products in fp32, summed in
    fp64); the linear assignment maximizes it. The permutations of an attention group
    (``spec.attention``) are one coordinate, solved together (``solve_group``). A coordinate changes
    only when its score strictly improves; the descent stops after a sweep that improves nothing,
    or after ``max_iter`` sweeps. With ``restarts`` N > 1 the descent runs N times, each from
    ``init`` with the next visiting orders of one generator seeded by ``seed`` (the first run is
    the single run's), and keeps the run of the largest objective ``sum over the spec's parameters
    of <reference, permuted other>`` (the first on ties).

    Tensors are read from the mappings when a score needs them (one parameter of each model at a
    time, converted to fp32), so a lazy mapping of a checkpoint is never held whole; a mapping with
    an ``info(key)`` method (``.shape``, ``.dtype``; as ``nlmerge.io.Checkpoint`` has) is validated
    from it without reading.

    Parameters
    ----------
    spec : PermutationSpec
        Permutations and the (parameter, axis) pairs they act on.
    reference, other : Mapping[str, Tensor]
        State dicts with the same shapes on every parameter of the spec; read, never modified.
    max_iter : int
        Maximum number of sweeps per run, >= 1.
    seed : int
        Seed of the visiting orders (any int).
    init : Mapping[str, Tensor], optional
        Starting permutations (default: identities).
    restarts : int
        Number of runs, >= 1.
    return_info : bool
        Also return ``{"sweeps": int, "converged": bool, "objective": float, "restart": int,
        "objectives": [float per run]}`` (``sweeps``, ``converged`` of the kept run).

    Returns
    -------
    dict
        ``{perm_name: int64 tensor}`` (CPU), ``perms[p][i] = j``: unit i of the aligned model is
        unit j of ``other`` (new tensors). With ``return_info``, ``(perms, info)``.

    Raises
    ------
    ValueError
        The spec does not fit a state dict, shapes differ, ``max_iter`` or ``restarts`` < 1, or a
        bad ``init`` (an attention group's members that do not move together included).
    TypeError
        ``max_iter``, ``restarts`` or ``seed`` not an int.
    """
    ref_meta = _meta(reference, spec.params, "reference")
    oth_meta = _meta(other, spec.params, "other")
    sizes = spec.validate(ref_meta)
    for param in spec.params:
        if ref_meta[param].shape != oth_meta[param].shape:
            raise ValueError(f"parameter {param!r}: shapes differ, {tuple(ref_meta[param].shape)} "
                             f"vs {tuple(oth_meta[param].shape)}")
    max_iter = check_int(max_iter, "max_iter", 1)
    restarts = check_int(restarts, "restarts", 1)
    seed = check_int(seed, "seed")
    start = {p: torch.arange(n) for p, n in sizes.items()}
    for p, value in dict(init or {}).items():
        if p not in start:
            raise ValueError(f"init has a permutation not in the spec: {p!r}")
        start[p] = check_permutation(p, value, sizes[p], spec.heads.get(p)).cpu().clone()  # never the caller's
    for name, group in spec.attention.items():
        check_group(name, group, start, sizes)
    # coordinates: each attention group as one, every other permutation alone
    coords = [(name, [g.q, g.k, g.v, g.o]) for name, g in spec.attention.items()]
    coords += [(p, [p]) for p in sizes if p not in spec.grouped]
    descent = _Descent(spec, reference, other, sizes)
    rng = random.Random(seed)
    best, objectives = None, []
    with torch.no_grad():
        for run in range(restarts):
            perms = {p: v.clone() for p, v in start.items()}
            sweeps, converged = _descend(descent, coords, perms, rng, max_iter)
            objectives.append(descent.objective(perms))
            if best is None or objectives[-1] > objectives[best[0]]:
                best = (run, perms, sweeps, converged)
    run, perms, sweeps, converged = best
    info = {"sweeps": sweeps, "converged": converged, "objective": objectives[run], "restart": run,
            "objectives": objectives}
    return (perms, info) if return_info else perms


def _descend(descent, coords, perms, rng, max_iter):
    """One coordinate descent from ``perms`` (updated in place); returns ``(sweeps, converged)``."""
    spec = descent.spec
    for sweep in range(1, max_iter + 1):
        improved = False
        for name, members in rng.sample(coords, len(coords)):
            scores = {p: descent.score(p, perms) for p in dict.fromkeys(members)}
            if name in spec.attention:
                new = solve_group(spec.attention[name], scores)
            else:
                new = {name: solve_assignment(scores[name], spec.heads.get(name))}
            old_value = sum(assignment_score(scores[p], perms[p]) for p in scores)
            new_value = sum(assignment_score(scores[p], new[p]) for p in scores)
            if new_value > old_value + 1e-12 * max(1.0, abs(old_value)):
                perms.update(new)
                improved = True
        if not improved:
            return sweep, True
    return max_iter, False
