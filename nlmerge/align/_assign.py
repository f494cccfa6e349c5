"""Linear assignment (maximize) on a score matrix, flat or head-structured."""
import torch
from scipy.optimize import linear_sum_assignment


def _lsa(score):
    """Column index of each row in the assignment maximizing ``score`` (float64 CPU tensor)."""
    return torch.as_tensor(linear_sum_assignment(score.numpy(), maximize=True)[1], dtype=torch.int64)


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
    if not bool(torch.isfinite(s).all()):
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
