"""Exact k-th smallest magnitude over tensors that arrive one at a time (never held together).

The merge job's global TIES reads a model key by key from disk; the threshold of each task is the
same one ``magnitude_threshold`` computes over all of the task's tensors taken together. Counts
are int64 tensors, so the result does not depend on how the data is split (by keys, chunks or
processes): the tensors named below are what a many-process job all-reduces (sums), or what
:meth:`~MagnitudeSelector.add` adds.

**One read** (the common case; ``selection``'s module docstring has the method):

1. sample pass — :meth:`~MagnitudeSelector.sample` / :meth:`~MagnitudeSelector.sample_models` on
   every tensor: reads only ``ceil(n / sample_stride)`` elements of each (stratified positions
   that depend on ``(n, sample_stride, seed)`` only; pass lazily mapped tensors and nothing else
   is read). Counts go to ``sample_counts`` (int64 [HIGH_BINS + 1]). *All-reduce
   ``sample_counts``.*
2. :meth:`~MagnitudeSelector.bracket` ``(k)``: the window of bit patterns, from the summed sample
   (the same on every process); allocates ``window_counts`` (int64 [1 + width]).
3. counting pass — :meth:`~MagnitudeSelector.count_window` /
   :meth:`~MagnitudeSelector.count_window_models` on every tensor: the one full read
   (:func:`count_window_models_tasks` counts T tasks' selectors over a key of the models in one
   read of the base and the T experts). *All-reduce ``window_counts``.*
4. :attr:`~MagnitudeSelector.hit`: True → :meth:`~MagnitudeSelector.threshold` is exact.

**Fallback** (``hit`` False: the sample missed; rare): the two histogram passes —
:meth:`~MagnitudeSelector.count` / :meth:`~MagnitudeSelector.count_models` (high 16 bits of the
fp32 magnitudes into ``high``, int64 [HIGH_BINS]; *all-reduce ``high``*),
:meth:`~MagnitudeSelector.locate` ``(k)``, :meth:`~MagnitudeSelector.count_low` /
:meth:`~MagnitudeSelector.count_low_models` (low 16 bits of the elements in the located bin into
``low``, int64 [LOW_BINS]; *all-reduce ``low``*), then :meth:`~MagnitudeSelector.threshold`.

The ``*_models`` methods count the task vector ``fp32(expert) - fp32(base)`` of a key from the
models themselves (the C++ and Triton kernels form it as they count: no fp32 copy); their counts equal those
of the plain methods on that task vector. The fused one-read pass is the C++ kernel; the reference
(``backend="torch"``) and Triton count with torch ops.

:func:`kth_smallest_magnitudes_streaming` runs the whole protocol for T tasks over a model that a
caller streams (the merge job): the sample and counting passes each read a key's base and T
experts once (:func:`sample_models_tasks`, :func:`count_window_models_tasks`). Tensors held in
memory take ``selection.kth_smallest_magnitudes_models`` instead (candidates collected, no
histograms; its memory grows with the model, which a job streaming a large model cannot afford).
"""
import torch

from nlmerge.ops._checks import check_float, check_models, first_nonfinite_model, raise_nonfinite
from nlmerge.ops._dispatch import resolve
from nlmerge.ops.selection import (
    _NONFINITE_BIN,
    HIGH_BINS,
    LOW_BINS,
    _fp32_bits as _bits,
    _locate,
    add_sample,
    add_sample_models,
    add_sample_models_tasks,
    bracket,
    count_models,
    count_window,
    count_window_models,
    window_bits,
)


class MagnitudeSelector:
    """Streaming exact selection of the k-th smallest fp32 magnitude (1-based).

    Parameters
    ----------
    device : torch.device or str
        Where the counts live (the tensors' device).
    backend : None, "torch", "cpu" or "triton"
        Counting kernels (``"torch"``: torch ops, the reference).
    sample_stride : int
        One sampled element per ``sample_stride`` (>= 1). A job that knows the element count
        ``d`` of a task passes ``selection.sample_stride(d)`` (about 2^15 samples); a larger
        sample narrows the window, a smaller one reads less in the sample pass.
    seed : int
        Seed of the sample positions (any fixed value; every process must use the same).

    Tensors of any float dtype are counted by their magnitude rounded to fp32 (exact for fp16,
    bf16 and fp32 inputs). Non-finite values raise :class:`nlmerge.ops.NonFiniteError` naming
    the tensor, in the counting passes.
    """

    def __init__(self, device="cpu", *, backend=None, sample_stride=1024, seed=0):
        if isinstance(sample_stride, bool) or not isinstance(sample_stride, int) or sample_stride < 1:
            raise ValueError(f"sample_stride must be an integer >= 1, got {sample_stride!r}")
        self.device = torch.device(device)
        _, self._kernels = resolve(backend, self.device, "kth_smallest_magnitude")
        self.sample_stride, self.seed = sample_stride, int(seed)
        self.sample_counts = torch.zeros(HIGH_BINS + 1, dtype=torch.int64, device=self.device)
        self.window_counts = None
        self.high = torch.zeros(HIGH_BINS, dtype=torch.int64, device=self.device)
        self.low = torch.zeros(LOW_BINS, dtype=torch.int64, device=self.device)
        self._lo = None  # window start (bit pattern) after bracket(k)
        self._k = None
        self._bin = None
        self._rank = None

    @property
    def sampled_numel(self):
        """Number of elements of the tensors sampled so far (``d`` of the one-read protocol)."""
        return int(self.sample_counts[HIGH_BINS])

    def sample(self, x, name="x"):
        """Sample pass: add the sample of ``|x|`` (fp32) to ``sample_counts``."""
        check_float(x, name)
        add_sample(self.sample_counts, x, self.sample_stride, self.seed)

    def sample_models(self, base, expert):
        """Sample pass over a key of the models: add the sample of ``|fp32(expert) - fp32(base)|``
        (one shape; each tensor's own dtype) to ``sample_counts``, reading only the sampled
        elements of both."""
        flat_base, (flat,) = check_models(base, [expert])
        add_sample_models(self.sample_counts, flat_base, flat, self.sample_stride, self.seed)

    def bracket(self, k):
        """Fix the rank ``k`` (``1 <= k <= sampled_numel``) and the window from the (summed) sample;
        zeroes ``window_counts``. Returns self."""
        d = self.sampled_numel
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= d:
            raise ValueError(f"k must be an integer in [1, {d}], got {k!r}")
        self._lo, width = bracket(self.sample_counts, k)
        self._k = k
        self.window_counts = torch.zeros(width + 1, dtype=torch.int64, device=self.device)
        return self

    def _window(self, what):
        if self.window_counts is None:
            raise RuntimeError(f"call bracket(k) after the sample pass before {what}")
        return self.window_counts

    def count_window(self, x, name="x"):
        """Counting pass (the one read): add ``x`` to ``window_counts`` (below the window, then one
        bin per bit pattern in it)."""
        check_float(x, name)
        flat = x.detach().reshape(-1).float().contiguous()
        if count_window(self._kernels, flat, self._window("count_window"), self._lo):
            raise_nonfinite([(name, flat, False)])

    def count_window_models(self, base, expert, label="expert"):
        """Counting pass over a key of the models: ``count_window`` of ``fp32(expert) - fp32(base)``.
        Raises NonFiniteError naming ``"base"``, ``label`` or ``"<label> - base"``."""
        flat_base, (flat,) = check_models(base, [expert])
        flat_base, flat = flat_base.contiguous(), flat.contiguous()
        if count_window_models(self._kernels, flat_base, flat, self._window("count_window_models"), self._lo):
            _raise_model(flat_base, flat, label)

    @property
    def hit(self):
        """Whether the (summed) ``window_counts`` hold the k-th magnitude: then ``threshold()`` needs
        no other pass; else run the fallback histogram passes."""
        return window_bits(self._window("hit"), self._lo, self._k) is not None

    @property
    def total(self):
        """Number of elements counted into ``high`` (:meth:`count`, :meth:`count_models`) so far."""
        return int(self.high.sum())

    def count(self, x, name="x"):
        """Fallback, first histogram pass: add the high 16 bits of ``|x|`` (fp32) to ``high``."""
        check_float(x, name)
        x = x.detach().reshape(-1).float().contiguous()
        if self._kernels is None:
            self.high += torch.bincount(_bits(x) >> 16, minlength=HIGH_BINS)[:HIGH_BINS]
        else:
            self._kernels.hist_magnitude(x, self.high, 16)
        if int(self.high[_NONFINITE_BIN[torch.float32]:].sum()):
            raise_nonfinite([(name, x, False)])

    def count_models(self, base, expert, label="expert"):
        """Fallback, first histogram pass over a key of the models: add the high 16 bits of ``|fp32(expert) -
        fp32(base)|`` to the histogram.

        ``base`` and ``expert``: float tensors of one shape and device (dtypes other than each
        other's are compared in fp32). Raises NonFiniteError naming ``"base"``, ``label`` (the
        expert), or ``"<label> - base"`` (a difference that overflows fp32).
        """
        flat_base, (flat,) = check_models(base, [expert])
        count_models(self._kernels, flat_base.contiguous(), flat.contiguous(), self.high)
        if int(self.high[_NONFINITE_BIN[torch.float32]:].sum()):
            _raise_model(flat_base, flat, label)

    def count_low_models(self, base, expert):
        """Fallback, second histogram pass over a key of the models: add the low 16 bits of the elements of
        ``|fp32(expert) - fp32(base)|`` in the located bin."""
        if self._bin is None:
            raise RuntimeError("call locate(k) after the first pass before count_low_models")
        flat_base, (flat,) = check_models(base, [expert])
        count_models(self._kernels, flat_base.contiguous(), flat.contiguous(), self.low, self._bin)

    def add(self, other):
        """Add another selector's counts (e.g. from another process, at the same step): the sample,
        the window (same ``bracket``), ``high`` and ``low``."""
        self.sample_counts += other.sample_counts.to(self.device)
        if self.window_counts is not None and other.window_counts is not None:
            if (self._lo, self.window_counts.numel()) != (other._lo, other.window_counts.numel()):
                raise ValueError("the selectors' windows differ: bracket both from the same summed sample")
            self.window_counts += other.window_counts.to(self.device)
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
        """Fallback, second histogram pass: add the low 16 bits of the elements of ``|x|`` in the located bin."""
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
        """The exact k-th smallest magnitude: a 0-dim fp32 tensor on ``device`` — from the window
        when it holds the k-th magnitude, else from the fallback passes' histograms."""
        found = None if self.window_counts is None else window_bits(self.window_counts, self._lo, self._k)
        if found is None:
            if self._bin is None:
                raise RuntimeError("no threshold yet: run the one-read passes (a hit), or the histogram passes "
                                   "(count, locate(k), count_low)")
            counted = int(self.low.sum())
            if counted < self._rank:
                raise RuntimeError(f"the second pass saw {counted} elements in the located bin, fewer than the "
                                   f"rank {self._rank}: count_low must see the same tensors as count")
            low_bin, _ = _locate(self.low, self._rank)
            found = (self._bin << 16) | low_bin
        return torch.tensor(found, dtype=torch.int32).view(torch.float32).to(self.device)


def sample_models_tasks(selectors, base, experts):
    """The sample pass of T tasks over one key of the models: ``selectors[t].sample_models(base,
    experts[t])`` for every t, the base's sampled elements read once (the selectors share
    ``sample_stride`` and ``seed``, hence the positions; otherwise task by task)."""
    if len({(s.sample_stride, s.seed) for s in selectors}) > 1:
        for selector, expert in zip(selectors, experts):
            selector.sample_models(base, expert)
        return
    flat_base, flat = check_models(base, list(experts))
    add_sample_models_tasks([s.sample_counts for s in selectors], flat_base, flat, selectors[0].sample_stride,
                            selectors[0].seed)


def count_window_models_tasks(selectors, base, experts, labels):
    """The counting pass of T tasks over one key of the models:
    ``selectors[t].count_window_models(base, experts[t], labels[t])`` for every t, in one read of
    the base and the experts when the selectors count on the C++ kernels (each task's window in
    its own histogram, the counts the same as task by task); otherwise task by task.

    Parameters
    ----------
    selectors : sequence of T MagnitudeSelector
        Bracketed (``bracket(k)`` called), on one device and backend.
    base : Tensor
        The key's base tensor (fp32, fp16 or bf16).
    experts : sequence of T Tensor
        The key's expert tensors, the base's shape and device.
    labels : sequence of T str
        The names a NonFiniteError gives the experts.

    Raises
    ------
    NonFiniteError
        NaN/Inf in the base, an expert or a difference, named as in ``count_window_models``.
    """
    kernels = selectors[0]._kernels if selectors else None
    if not (len(selectors) > 1 and hasattr(kernels, "count_window_models_tasks")
            and all(s._kernels is kernels for s in selectors)):
        for selector, expert, label in zip(selectors, experts, labels):
            selector.count_window_models(base, expert, label)
        return
    flat_base, flat = check_models(base, list(experts))
    flat_base, flat = flat_base.contiguous(), [x.contiguous() for x in flat]
    hists = [s._window("count_window_models_tasks") for s in selectors]
    nonfinite = kernels.count_window_models_tasks(flat_base, flat, hists, [s._lo for s in selectors])
    for x, label, count in zip(flat, labels, nonfinite):
        if count:
            _raise_model(flat_base, x, label)


def _raise_model(base, expert, label):
    err = first_nonfinite_model(base, [expert], [label])
    if err is None:
        raise AssertionError("a kernel counted non-finite values that torch.isfinite does not see")
    raise err


def kth_smallest_magnitudes_streaming(ranks, one_pass, *, device="cpu", backend=None, sample_stride=1024,
                                      sum_=None):
    """Exact k-th smallest magnitudes of T task vectors over a model streamed key by key (never
    held together): the one-read protocol of :class:`MagnitudeSelector` for all tasks at once —
    a sample pass, a bracket per task, one counting pass that reads the base and the T experts of a
    key once (:func:`count_window_models_tasks`), and the two histogram passes for the tasks whose
    bracket missed (rare).

    Parameters
    ----------
    ranks : sequence of T int
        Rank (1-based) of each task's magnitude among all its elements; a task with a rank below 1
        is not counted and gets 0 (nothing is trimmed).
    one_pass : callable
        ``one_pass(what, count)`` reads every key once, in any order and split, and calls ``count(base,
        experts, labels)`` for each: the key's base tensor, its T expert tensors (float, the base's
        shape and device) and T names for a NonFiniteError. ``what`` (``"sample"``, ``"count"``,
        ``"high bits"``, ``"low bits"``) names the pass, e.g. for a progress bar. Passes that count
        a subset of the tasks still receive all T experts.
    device, backend : as in :class:`MagnitudeSelector`
    sample_stride : int
        One sampled element per ``sample_stride``: ``selection.sample_stride(d)`` for ``d`` elements.
    sum_ : callable, optional
        ``sum_(counts)`` sums an int64 tensor of counts over the processes in place (after each pass;
        e.g. an all-reduce); None for one process.

    Returns
    -------
    Tensor
        fp32 [T] on ``device``.

    Raises
    ------
    NonFiniteError
        NaN/Inf in a base, an expert or a difference (from the counting passes).
    """
    selectors = [MagnitudeSelector(device, backend=backend, sample_stride=sample_stride) for _ in ranks]
    tasks = [t for t, k in enumerate(ranks) if k >= 1]
    sum_ = sum_ or (lambda counts: None)

    def pass_over(what, tasks, count):
        one_pass(what, lambda base, experts, labels: count(
            [selectors[t] for t in tasks], base, [experts[t] for t in tasks], [labels[t] for t in tasks]))

    def each_task(count):
        def count_tasks(selected, base, experts, labels):
            for selector, expert, label in zip(selected, experts, labels):
                count(selector, base, expert, label)
        return count_tasks

    if tasks:
        pass_over("sample", tasks, lambda selected, base, experts, _: sample_models_tasks(selected, base, experts))
        for t in tasks:
            sum_(selectors[t].sample_counts)
            selectors[t].bracket(ranks[t])
        pass_over("count", tasks, count_window_models_tasks)
        for t in tasks:
            sum_(selectors[t].window_counts)
    missed = [t for t in tasks if not selectors[t].hit]
    if missed:  # the sample misled a bracket: the two histogram passes for those tasks
        pass_over("high bits", missed, each_task(MagnitudeSelector.count_models))
        for t in missed:
            sum_(selectors[t].high)
            selectors[t].locate(ranks[t])
        pass_over("low bits", missed, each_task(lambda selector, base, expert, _: selector.count_low_models(base, expert)))
        for t in missed:
            sum_(selectors[t].low)
    zero = torch.zeros((), dtype=torch.float32, device=device)
    return torch.stack([selectors[t].threshold() if t in tasks else zero for t in range(len(ranks))])

