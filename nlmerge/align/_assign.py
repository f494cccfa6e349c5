"""Linear assignment (maximize) on a score matrix, flat or head-structured.

The solver is ``lapx``'s ``lapjvh`` (Jonker-Volgenant, float64) when it is installed, else scipy's
``linear_sum_assignment``. Both are exact: they reach the same optimal objective, and the same
permutation wherever the optimum is unique; among tied optima (e.g. duplicate units) they may
pick different, equally optimal permutations. lapx is 1.4-5x faster on 8192-unit scores
(``benchmarks/bench_align.py --assignment``).
"""
import torch

try:  # the ``lap`` module of lapx; the older ``lap`` package of the same import name has no lapjvh
    from lap import lapjvh as _lapjvh
except ImportError:
    _lapjvh = None


def _lsa(score):
    """Column index of each row in the assignment maximizing ``score`` (float64 CPU tensor; it may
    be the caller's: lapx negates it in place and back, bit for bit, before returning)."""
    if _lapjvh is not None:
        # lapjvh minimizes. Negating in place spares a copy of the score (1.6 GB at 14336 units),
        # whose fresh pages cost more than lapjvh itself on a loaded machine; negation is exact.
        score.neg_()
        try:
            cols = _lapjvh(score.numpy(), return_cost=False)[1]  # rows come back in order 0..n-1
        finally:
            score.neg_()
    else:
        from scipy.optimize import linear_sum_assignment  # imported here: scipy adds 0.3 s to every command's start

        cols = linear_sum_assignment(score.numpy(), maximize=True)[1]
    return torch.as_tensor(cols, dtype=torch.int64)


def solve_assignment(score, heads=None):
    """Permutation maximizing ``sum_i score[i, perm[i]]``.

    Parameters
    ----------
    score : Tensor
        ``[n, n]`` scores: row i (a unit of the reference), column j (a unit of the other model).
    heads : int, optional
        Head count of a head-structured permutation: heads are matched first on the sum of each
        ``[d, d]`` block (``d = n // heads``), then units within each matched head pair.

    Returns
    -------
    Tensor
        int64 ``perm`` on the CPU, ``perm[i] = j``.
    """
    s = score.detach().to("cpu", torch.float64)
    if s.dim() != 2 or s.shape[0] != s.shape[1]:
        raise ValueError(f"score must be square, got shape {tuple(s.shape)}")
    # a NaN or Inf makes the sum non-finite; the elementwise test (a bool copy: seconds at 8192
    # units) only runs when the sum is not finite, which finite scores make only by overflowing
    if not bool(torch.isfinite(s.sum())) and not bool(torch.isfinite(s).all()):
        raise ValueError("score has non-finite entries")
    n = s.shape[0]
    if heads is None or heads == 1:
        return _lsa(s)
    d = n // heads
    head_perm = _lsa(s.reshape(heads, d, heads, d).sum(dim=(1, 3)))
    perm = torch.empty(n, dtype=torch.int64)
    for a, b in enumerate(head_perm.tolist()):
        perm[a * d:(a + 1) * d] = b * d + _lsa(s[a * d:(a + 1) * d, b * d:(b + 1) * d].contiguous())
    return perm


def assignment_score(score, perm):
    """``sum_i score[i, perm[i]]`` as a Python float (float64 sum)."""
    s = score.detach().to("cpu", torch.float64)
    return float(s[torch.arange(s.shape[0]), perm.cpu()].sum())


def _block_sums(score, rows, cols):
    """``score`` ``[rows * a, cols * b]`` summed over each ``[a, b]`` block: ``[rows, cols]``."""
    return score.reshape(rows, score.shape[0] // rows, cols, score.shape[1] // cols).sum(dim=(1, 3))


def solve_group(group, scores):
    """Permutations of an attention group (:class:`nlmerge.align.spec.AttentionGroup`) that
    maximize the summed assignment score of its members.

    Parameters
    ----------
    group : AttentionGroup
    scores : Mapping[str, Tensor]
        ``{perm_name: [n, n] score}`` of each member (a permutation serving two roles appears once).

    Returns
    -------
    dict
        ``{perm_name: int64 perm}`` of the members, composed by ``compose_heads``.

    Rule: hierarchical, as ``solve_assignment`` for heads. Key/value heads first, on the block
    sums of all four members' scores (q and o blocks span a whole query group); then, per
    matched key/value head pair, the query heads of the group on the block sums of q and o; then
    the q/k units (when ``group.qk_units``) on k's block plus q's blocks of the matched query heads,
    and the v/o units on v's block plus o's blocks of the matched query heads.
    """
    from nlmerge.align.spec import compose_heads

    n_kv, g = group.kv_heads, group.group
    s, seen = {}, set()
    for role, perm, _ in group.roles:
        s[role] = None if perm in seen else scores[perm].detach().to("cpu", torch.float64)
        seen.add(perm)
    present = {r: x for r, x in s.items() if x is not None}
    pi = _lsa(sum(_block_sums(x, n_kv, n_kv) for x in present.values()))
    # q and v always hold a score (k may be q's permutation, o v's)
    d = {"qk": s["q"].shape[0] // group.heads, "vo": s["v"].shape[0] // n_kv}
    rho = torch.zeros(n_kv, g, dtype=torch.int64)
    within = {"qk": torch.arange(d["qk"]).repeat(n_kv, 1), "vo": torch.empty(n_kv, d["vo"], dtype=torch.int64)}
    for a, b in enumerate(pi.tolist()):
        def head_block(x, heads_per, dim):  # the [heads_per * dim]^2 block of kv heads a and b
            w = heads_per * dim
            return x[a * w:(a + 1) * w, b * w:(b + 1) * w]

        q_ab = head_block(s["q"], g, d["qk"])
        o_ab = head_block(s["o"], g, d["vo"]) if s["o"] is not None else None
        query = _block_sums(q_ab, g, g) + (_block_sums(o_ab, g, g) if o_ab is not None else 0)
        rho[a] = _lsa(query) if g > 1 else torch.zeros(1, dtype=torch.int64)
        for units, single, multi in (("qk", "k", q_ab), ("vo", "v", o_ab)):
            if units == "qk" and not group.qk_units:
                continue
            cost = torch.zeros(d[units], d[units], dtype=torch.float64)
            if s[single] is not None:
                cost += head_block(s[single], 1, d[units])
            if multi is not None:
                du = d[units]
                for r, r2 in enumerate(rho[a].tolist()):
                    cost += multi[r * du:(r + 1) * du, r2 * du:(r2 + 1) * du]
            within[units][a] = _lsa(cost)
    zeros = torch.zeros(n_kv, 1, dtype=torch.int64)
    full = {"q": compose_heads(pi, rho, within["qk"]), "k": compose_heads(pi, zeros, within["qk"]),
            "v": compose_heads(pi, zeros, within["vo"]), "o": compose_heads(pi, rho, within["vo"])}
    return {perm: full[role] for role, perm, _ in group.roles}
