"""Exact k-th smallest magnitude over tensors that arrive one at a time (never held together).

The merge job's global TIES reads a model key by key from disk; the threshold of each task is the
same one ``magnitude_threshold`` computes over all of the task's tensors taken together, found in
two streaming passes over the data: :meth:`MagnitudeSelector.count` adds every tensor to a
histogram of the high 16 bits of its fp32 magnitudes, :meth:`~MagnitudeSelector.locate` fixes
the bin that holds the k-th one, :meth:`~MagnitudeSelector.count_low` adds the low 16 bits of the
elements in that bin, and :meth:`~MagnitudeSelector.threshold` returns the exact value. Counts are
int64, so the result does not depend on how the data is split (by keys, chunks or processes:
histograms of several selectors add with :meth:`~MagnitudeSelector.add`).

:meth:`~MagnitudeSelector.count_models` and :meth:`~MagnitudeSelector.count_low_models` count the
task vector ``fp32(expert) - fp32(base)`` of a key from the models themselves (the C++ kernels form
it as they count: no fp32 copy); the counts equal those of ``count``/``count_low`` on that task
vector.
"""
import torch

from nlmerge.ops._checks import check_float, check_models, first_nonfinite_model, raise_nonfinite
from nlmerge.ops._dispatch import resolve
from nlmerge.ops.selection import _NONFINITE_BIN, HIGH_BINS, LOW_BINS, _fp32_bits as _bits, _locate, count_models


class MagnitudeSelector:
    """Streaming exact selection of the k-th smallest fp32 magnitude (1-based).

    Parameters
    ----------
    device : torch.device or str
        Where the histograms live (the tensors' device).
    backend : None, "torch", "cpu" or "triton"
        Histogram kernels (``"torch"``: ``torch.bincount``, the reference).

    Tensors of any float dtype are counted by their magnitude rounded to fp32 (exact for fp16,
    bf16 and fp32 inputs). Non-finite values raise :class:`nlmerge.ops.NonFiniteError` naming
    the tensor.
    """

    def __init__(self, device="cpu", *, backend=None):
        self.device = torch.device(device)
        _, self._kernels = resolve(backend, self.device, "kth_smallest_magnitude")
        self.high = torch.zeros(HIGH_BINS, dtype=torch.int64, device=self.device)
        self.low = torch.zeros(LOW_BINS, dtype=torch.int64, device=self.device)
        self._bin = None
        self._rank = None

    @property
    def total(self):
        """Number of elements counted by :meth:`count` so far."""
        return int(self.high.sum())

    def count(self, x, name="x"):
        """First pass: add the high 16 bits of ``|x|`` (fp32) to the histogram."""
        check_float(x, name)
        x = x.detach().reshape(-1).float().contiguous()
        if self._kernels is None:
            self.high += torch.bincount(_bits(x) >> 16, minlength=HIGH_BINS)[:HIGH_BINS]
        else:
            self._kernels.hist_magnitude(x, self.high, 16)
        if int(self.high[_NONFINITE_BIN[torch.float32]:].sum()):
            raise_nonfinite([(name, x, False)])

    def count_models(self, base, expert, label="expert"):
        """First pass over a key of the models: add the high 16 bits of ``|fp32(expert) -
        fp32(base)|`` to the histogram.

        ``base`` and ``expert``: float tensors of one shape and device (dtypes other than each
        other's are compared in fp32). Raises NonFiniteError naming ``"base"``, ``label`` (the
        expert), or ``"<label> - base"`` (a difference that overflows fp32).
        """
        flat_base, (flat,) = check_models(base, [expert])
        count_models(self._kernels, flat_base.contiguous(), flat.contiguous(), self.high)
        if int(self.high[_NONFINITE_BIN[torch.float32]:].sum()):
            err = first_nonfinite_model(flat_base, [flat], [label])
            if err is None:
                raise AssertionError("a kernel counted non-finite values that torch.isfinite does not see")
            raise err

    def count_low_models(self, base, expert):
        """Second pass over a key of the models: add the low 16 bits of the elements of
        ``|fp32(expert) - fp32(base)|`` in the located bin."""
        if self._bin is None:
            raise RuntimeError("call locate(k) after the first pass before count_low_models")
        flat_base, (flat,) = check_models(base, [expert])
        count_models(self._kernels, flat_base.contiguous(), flat.contiguous(), self.low, self._bin)

    def add(self, other):
        """Add another selector's counts (e.g. from another process); same pass only."""
        self.high += other.high.to(self.device)
        self.low += other.low.to(self.device)

    def locate(self, k):
        """Fix the rank ``k`` (``1 <= k <= total``) after the first pass; returns self."""
        total = self.total
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= total:
            raise ValueError(f"k must be an integer in [1, {total}], got {k!r}")
        self._bin, self._rank = _locate(self.high, k)
        return self

    def count_low(self, x):
        """Second pass: add the low 16 bits of the elements of ``|x|`` in the located bin."""
        if self._bin is None:
            raise RuntimeError("call locate(k) after the first pass before count_low")
        x = x.detach().reshape(-1).float().contiguous()
        if self._kernels is None:
            bits = _bits(x)
            inside = bits[(bits >> 16) == self._bin] & 0xFFFF
            self.low += torch.bincount(inside, minlength=LOW_BINS)[:LOW_BINS]
        else:
            self._kernels.hist_magnitude_low(x, self.low, self._bin)

    def threshold(self):
        """The exact k-th smallest magnitude: a 0-dim fp32 tensor on ``device``."""
        if self._bin is None:
            raise RuntimeError("call locate(k) and count_low over every tensor first")
        found = int(self.low.sum())
        if found < self._rank:
            raise RuntimeError(f"the second pass saw {found} elements in the located bin, fewer than the rank "
                               f"{self._rank}: count_low must see the same tensors as count")
        low_bin, _ = _locate(self.low, self._rank)
        bits = torch.tensor((self._bin << 16) | low_bin, dtype=torch.int32)
        return bits.view(torch.float32).to(self.device)
