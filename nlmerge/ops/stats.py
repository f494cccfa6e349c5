"""Streaming activation statistics: means, variances, covariance and cross-correlation.

``StreamingStats`` accumulates, in one pass over batches, the count, mean and second central
moments (M2, co-moments) of one activation stream x [..., C] and optionally of a paired second
stream y [..., D] (activation matching correlates two models' units; TACT/REPAIR need means and
variances). Each batch is reduced to its own (count, mean, centred moments) and merged into the
running state with Chan's parallel rule, in float64:

    n = na + nb,  d = mean_b - mean_a,  mean = mean_a + d * nb / n,
    M2 = M2_a + M2_b + d d^T * na * nb / n.

Nothing computes ``E[xy] - E[x]E[y]``: activations often have a mean far larger than their spread,
where that formula cancels catastrophically.

Backends (``backend=None | "torch" | "cpu" | "triton"``, chosen by ``_dispatch.resolve``):

- ``"torch"``, the reference: each batch in float64, centred on its float64 mean, Gram by a float64
  matrix product.
- ``"cpu"``: each batch centred in fp32 on a shift (the mean of its first rows), in chunks of at
  least ``CPU_CHUNK`` rows (more for few channels, up to ``CPU_CHUNK_ELEMENTS``): fp32 column sums
  and an fp32 BLAS Gram per chunk, added into float64, then corrected exactly for the shift in
  float64 (``G - sx sy^T / n`` with ``sx`` the sums of the shifted data, which are small). Float64
  inputs use the reference.

  Means and variances alone (no ``y``, no covariance) take a faster route that skips the per-batch
  moments and merges: the running state is the float64 sums ``S = sum(x - K)`` and
  ``SS = sum((x - K)^2)`` per feature with a fixed float64 shift ``K`` (the feature's first value
  in the first batch), which the C++ kernel ``channel_stats`` updates in place, reading each
  batch once, in any layout ``[outer, C, inner]`` (``feature_axis``: no channels-last copy of a
  conv activation), every dtype including float64. The differences are formed in float64, so
  ``SS/n - (S/n)^2`` keeps a relative error near ``1e-16 * (1 + ((mean - K) / std)^2)`` (1e-8 with
  the mean 1e4 standard deviations away from ``K``), and a constant feature has ``K`` equal to it
  and variance exactly 0. The sums are folded into the Chan form when a result is read or the
  accumulator is merged; updates may go on after that.
- ``"triton"``: the shifted scheme with shift = the batch mean, in fused kernels
  (``nlmerge/kernels/triton_stats.py``): float64 column sums (the shift; they also flag NaN/Inf),
  then one kernel for the centred Gram (``tl.dot(..., input_precision="ieee")`` on fp32 tiles,
  folded into float64 every chunk of rows) and the centred column moments; no centred copy is
  materialized.

A fast backend whose fp32 products overflow (``|x - mean|`` beyond ~1e19) is not trusted for that
batch: the batch is recomputed by the reference, so results stay finite and accurate.
"""
import math

import torch

from nlmerge.ops._checks import NonFiniteError, check_finite
from nlmerge.ops._dispatch import resolve

INPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
CPU_CHUNK = 1024  # least rows per fp32 chunk on the "cpu" backend; chunk sums and Grams are added in float64
CPU_CHUNK_ELEMENTS = 1 << 18  # a chunk of few channels gets more rows (1 MiB of fp32): fewer small calls


class _Moments:
    """Count, means and centred second moments of one batch or of a running accumulator (float64)."""

    __slots__ = ("n", "mean_x", "m2_x", "mean_y", "m2_y", "cxy", "cxx")

    def __init__(self, n, mean_x, m2_x, mean_y=None, m2_y=None, cxy=None, cxx=None):
        self.n, self.mean_x, self.m2_x = n, mean_x, m2_x
        self.mean_y, self.m2_y, self.cxy, self.cxx = mean_y, m2_y, cxy, cxx

    def to(self, device):
        """This state with every tensor on ``device``."""
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return _Moments(self.n, *(move(getattr(self, k)) for k in self.__slots__[1:]))

    def finite(self):
        """True when every tensor is finite (a fast backend's fp32 products did not overflow)."""
        return all(t is None or bool(torch.isfinite(t).all()) for t in (getattr(self, k) for k in self.__slots__[1:]))


def chan_merge(a, b):
    """Chan's parallel rule: the moments of the union of the data behind ``a`` and ``b``.

    Parameters
    ----------
    a, b : _Moments
        Float64 moments on one device; either may have ``n == 0``.

    Returns
    -------
    _Moments
    """
    if b.n == 0:
        return a
    if a.n == 0:
        return b
    n = a.n + b.n
    fb = b.n / n
    dx = b.mean_x - a.mean_x
    out = _Moments(n, a.mean_x + dx * fb, a.m2_x + b.m2_x + dx * dx * (a.n * fb))
    if a.mean_y is not None:
        dy = b.mean_y - a.mean_y
        out.mean_y = a.mean_y + dy * fb
        out.m2_y = a.m2_y + b.m2_y + dy * dy * (a.n * fb)
        out.cxy = a.cxy + b.cxy + torch.outer(dx, dy) * (a.n * fb)
    if a.cxx is not None:
        out.cxx = a.cxx + b.cxx + torch.outer(dx, dx) * (a.n * fb)
    return out


def batch_moments_reference(x, y, covariance):
    """The specification of one batch: float64 mean, centred sums of squares and Gram matrices.

    Parameters
    ----------
    x : Tensor [M, C]
    y : Tensor [M, D] or None
    covariance : bool
        Also compute ``x_c^T x_c``.

    Returns
    -------
    _Moments
    """
    xd = x.double()
    mean_x = xd.mean(dim=0)
    xc = xd - mean_x
    out = _Moments(x.shape[0], mean_x, (xc * xc).sum(dim=0))
    if y is not None:
        yd = y.double()
        out.mean_y = yd.mean(dim=0)
        yc = yd - out.mean_y
        out.m2_y = (yc * yc).sum(dim=0)
        out.cxy = xc.T @ yc
    if covariance:
        out.cxx = xc.T @ xc
    return out


def _from_shifted(n, shift, s, ss):
    """Mean and M2 from the column sums ``s`` and ``ss`` of ``x - shift``."""
    return shift.double() + s / n, (ss - s * s / n).clamp_min_(0.0)


def batch_moments_cpu(x, y, covariance):
    """One batch on the "cpu" backend: fp32 centring and fp32 BLAS Gram, chunk by chunk.

    The shift is the fp32 mean of the first chunk (any shift within a few standard deviations of
    the mean keeps fp32 accurate; the exact shift correction is applied in float64). Rows are
    processed in chunks of ``CPU_CHUNK`` rows or more, up to ``CPU_CHUNK_ELEMENTS`` (centred fp32
    temporaries stay in cache); column sums and
    the fp32 Gram of each chunk are added into float64. NaN/Inf inputs (or fp32 overflow) show up
    as non-finite results, which the caller checks. Same parameters and result as
    ``batch_moments_reference``.
    """
    n = x.shape[0]
    chunk = max(CPU_CHUNK, CPU_CHUNK_ELEMENTS // max(x.shape[1], 1 if y is None else y.shape[1]))
    first = min(n, CPU_CHUNK)
    # float64 sums: a constant column's shift is then exactly its value, so dead units stay dead
    sh_x = (x[:first].sum(dim=0, dtype=torch.float64) / first).float()
    sh_y = None if y is None else (y[:first].sum(dim=0, dtype=torch.float64) / first).float()
    zeros = lambda k: torch.zeros(k, dtype=torch.float64, device=x.device)  # noqa: E731
    sx, ssx = zeros(x.shape[1]), zeros(x.shape[1])
    if y is not None:
        sy, ssy = zeros(y.shape[1]), zeros(y.shape[1])
        gxy = zeros((x.shape[1], y.shape[1]))
    if covariance:
        gxx = zeros((x.shape[1], x.shape[1]))
    for start in range(0, n, chunk):
        xc = torch.sub(x[start : start + chunk], sh_x)  # fp32 (type promotion), one pass
        sx += xc.sum(dim=0)
        ssx += (xc * xc).sum(dim=0)
        if y is not None:
            yc = torch.sub(y[start : start + chunk], sh_y)
            sy += yc.sum(dim=0)
            ssy += (yc * yc).sum(dim=0)
            gxy += xc.T @ yc
        if covariance:
            gxx += xc.T @ xc
    out = _Moments(n, *_from_shifted(n, sh_x, sx, ssx))
    if y is not None:
        out.mean_y, out.m2_y = _from_shifted(n, sh_y, sy, ssy)
        out.cxy = gxy.sub_(torch.outer(sx, sy).div_(n))
    if covariance:
        out.cxx = gxx.sub_(torch.outer(sx, sx).div_(n))
    return out


def batch_moments_triton(module, x, y, covariance):
    """One batch on the "triton" backend (fused kernels of ``nlmerge.kernels.triton_stats``).

    Passes over the data: the column sums of x (and y) give the shift (and flag NaN/Inf), then one
    fused kernel yields the centred Gram and the centred column moments; without a Gram, a second
    column-sums pass gives the moments. Same parameters and result as ``batch_moments_reference``.
    """
    n = x.shape[0]

    def shift(t, name):
        total = module.column_sums(t)
        if not bool(torch.isfinite(total).all()):
            raise NonFiniteError(name)
        return (total / n).to(torch.float32)

    sh_x = shift(x, "x")
    sh_y = None if y is None else shift(y, "y")
    out = _Moments(n, None, None)
    sx = None
    if y is not None:
        gxy, sx, ssx, sy, ssy = module.centred_gram(x, y, sh_x, sh_y)
        out.mean_y, out.m2_y = _from_shifted(n, sh_y, sy, ssy)
        out.cxy = gxy.sub_(torch.outer(sx, sy).div_(n))
    if covariance:
        gxx, sxa, ssxa, _, _ = module.centred_gram(x, x, sh_x, sh_x)
        if sx is None:
            sx, ssx = sxa, ssxa
        out.cxx = gxx.sub_(torch.outer(sxa, sxa).div_(n))
    if sx is None:
        sx, ssx = module.column_sums(x, sh_x, squares=True)
    out.mean_x, out.m2_x = _from_shifted(n, sh_x, sx, ssx)
    return out


def _correlation(c, var_a, var_b):
    """Pearson correlation from a covariance and the two variances; 0 where a unit is dead."""
    denom = torch.sqrt(torch.outer(var_a, var_b))
    alive = denom > 0
    return torch.where(alive, c / torch.where(alive, denom, torch.ones_like(denom)), torch.zeros_like(c)).clamp_(-1.0, 1.0)


class StreamingStats:
    """Streaming mean, variance, covariance and cross-correlation of activations, in one pass.

    Parameters
    ----------
    num_features : int
        C, the size of the feature axis of ``x`` (the last one unless ``update`` says otherwise).
    other_features : int, optional
        D, the size of the last dim of a paired second stream ``y``; when given, every
        ``update`` needs ``y`` and ``cross_cov``/``cross_corr`` are available.
    covariance : bool
        Also accumulate the [C, C] covariance of ``x`` (``cov``, ``corr``).
    device : torch.device or str, optional
        Where the float64 state lives; default the first batch's device.
    backend : None, "torch", "cpu" or "triton"
        None is auto (see ``nlmerge.ops._dispatch``); float64 inputs use the reference, except on
        the "cpu" fast path (means and variances only), whose float64 kernel serves every dtype.
    """

    def __init__(self, num_features, other_features=None, *, covariance=False, device=None, backend=None):
        self.num_features = _positive_int(num_features, "num_features")
        self.other_features = None if other_features is None else _positive_int(other_features, "other_features")
        self.covariance = bool(covariance)
        self.device = None if device is None else torch.device(device)
        self.backend = backend
        self._state = None  # _Moments, or None before any data
        self._shifted = None  # _Shifted sums of the "cpu" fast path not folded into _state yet
        self._resolved = None  # (device, backend name, kernel module): resolved once per device

    # ------------------------------------------------------------------ accumulation

    def update(self, x, y=None, *, feature_axis=-1):
        """Add one batch.

        Parameters
        ----------
        x : Tensor
            fp32, fp16, bf16 or fp64, with its C features along ``feature_axis``; reduced over
            every other axis.
        y : Tensor, optional
            Paired activations of a second model, D features along ``feature_axis`` and the same
            other dims as ``x`` (required iff ``other_features`` was given).
        feature_axis : int
            The features' axis of ``x`` (and ``y``): -1 for ``[..., C]``, 1 for NCHW conv outputs.

        Returns
        -------
        StreamingStats
            self.

        Raises
        ------
        NonFiniteError
            ``x`` or ``y`` holds NaN or Inf (named in the error); the state is unchanged.
        """
        if y is None and self.other_features is None and not self.covariance:
            name, module = self._resolve(x)
            if name == "cpu":
                return self._update_shifted(module, x, feature_axis)
        return self._update_moments(x, y, feature_axis)

    def _resolve(self, x):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if self._resolved is None or self._resolved[0] != x.device:
            name, module = resolve(self.backend, x.device, "streaming_stats", triton_module="triton_stats")
            self._resolved = (x.device, name, module)
        return self._resolved[1:]

    def _update_shifted(self, module, x, feature_axis):
        """The "cpu" fast path: the kernel adds the batch's shifted sums into ``_shifted``."""
        axis = _feature_axis(x, "x", self.num_features, feature_axis)
        if x.numel() == 0:
            return self
        x = x.detach()  # the kernel reads memory: autograd has nothing to follow here
        shape = x.shape
        outer, inner = math.prod(shape[:axis]), math.prod(shape[axis + 1 :])
        if not x.is_contiguous():
            last = x.movedim(axis, -1)  # e.g. a channels_last conv output: already [M, C] in memory
            x, outer, inner = (last, outer * inner, 1) if last.is_contiguous() else (x.contiguous(), outer, inner)
        sh = self._shifted
        fresh = sh is None
        if fresh:
            sh = _Shifted(_first_values(x, outer, self.num_features, inner))
        if not module.channel_stats(x, outer, inner, sh.shift, sh.s, sh.ss):
            check_finite([("x", x, False)])
            # finite float64 data whose squares overflow: the reference gives this batch its moments
            return self._update_moments(x.view(outer, self.num_features, inner), None, 1)
        sh.n += outer * inner
        if fresh:
            self._shifted = sh
        if self.device is None:
            self.device = x.device
        return self

    def _update_moments(self, x, y, feature_axis):
        """Every other path: the batch's own moments, merged into the state with Chan's rule."""
        x2 = self._check_input(x, "x", self.num_features, feature_axis)
        if self.other_features is None:
            if y is not None:
                raise ValueError("y was given but this StreamingStats has no second stream (other_features=None)")
            y2 = None
        else:
            if y is None:
                raise ValueError(
                    f"y is required: this StreamingStats pairs x with a second stream of {self.other_features} features"
                )
            y2 = self._check_input(y, "y", self.other_features, feature_axis)
            if _other_dims(y, feature_axis) != _other_dims(x, feature_axis):
                raise ValueError(
                    f"y has leading dims {_other_dims(y, feature_axis)} but x has {_other_dims(x, feature_axis)} "
                    "(every dim but the feature axis must match)"
                )
            if y.device != x.device:
                raise ValueError(f"y is on {y.device} but x is on {x.device}")
        if x2.shape[0] == 0:
            return self
        batch = self._batch(x2, y2)
        if self.device is None:
            self.device = x.device
        if self._state is None:
            self._state = _Moments(0, None, None)
        self._state = chan_merge(self._state, batch.to(self.device))
        return self

    def _batch(self, x, y):
        name, module = self._resolve(x)
        fast = name != "torch" and x.dtype != torch.float64 and (y is None or y.dtype != torch.float64)
        if not fast:
            check_finite([("x", x, False), ("y", y, False)])
            return batch_moments_reference(x, y, self.covariance)
        if name == "triton":
            batch = batch_moments_triton(module, x, y, self.covariance)
        else:
            batch = batch_moments_cpu(x, y, self.covariance)
        if not batch.finite():  # a non-finite input (named here), or fp32 overflow: redo in float64
            check_finite([("x", x, False), ("y", y, False)])
            batch = batch_moments_reference(x, y, self.covariance)
        return batch

    @staticmethod
    def _check_input(t, name, features, feature_axis):
        """``t`` as a [M, features] matrix with unit feature stride (features moved last: one copy)."""
        axis = _feature_axis(t, name, features, feature_axis)
        if axis != t.dim() - 1:
            t = t.movedim(axis, -1)
        flat = t.reshape(-1, features)
        return flat if flat.stride(-1) == 1 else flat.contiguous()

    def _fold(self):
        """Move the fast path's shifted sums into ``_state`` (Chan form); keep its shift for more updates."""
        sh = self._shifted
        if sh is None or sh.n == 0:
            return
        batch = _Moments(sh.n, *_from_shifted(sh.n, sh.shift, sh.s, sh.ss))
        self._state = chan_merge(self._state or _Moments(0, None, None), batch.to(self.device))
        sh.n = 0
        sh.s.zero_()
        sh.ss.zero_()

    def merge(self, other):
        """Add another accumulator's data (e.g. from another process) to this one.

        Parameters
        ----------
        other : StreamingStats
            Same ``num_features``, ``other_features`` and ``covariance``; not modified.

        Returns
        -------
        StreamingStats
            self.
        """
        if not isinstance(other, StreamingStats):
            raise TypeError(f"merge takes a StreamingStats, got {type(other).__name__}")
        mine = (self.num_features, self.other_features, self.covariance)
        theirs = (other.num_features, other.other_features, other.covariance)
        if mine != theirs:
            raise ValueError(
                "cannot merge StreamingStats of different shapes: (num_features, other_features, covariance) "
                f"{mine} vs {theirs}"
            )
        other._fold()  # the same data in the form chan_merge reads
        if other._state is None or other._state.n == 0:
            return self
        if self.device is None:
            self.device = other.device
        if self._state is None:
            self._state = _Moments(0, None, None)
        self._state = chan_merge(self._state, other._state.to(self.device))
        return self

    # ------------------------------------------------------------------ results

    @property
    def count(self):
        """Number of rows (samples) seen, an int."""
        return (0 if self._state is None else self._state.n) + (0 if self._shifted is None else self._shifted.n)

    def _get(self):
        if self.count == 0:
            raise ValueError("StreamingStats has seen no data yet")
        self._fold()
        return self._state

    def _need_y(self, what):
        if self.other_features is None:
            raise ValueError(f"{what} needs a second stream: construct StreamingStats with other_features")
        return self._get()

    @property
    def mean(self):
        """Mean of x per feature, float64 [C]."""
        return self._get().mean_x.clone()

    @property
    def var(self):
        """Population variance of x (divided by count), float64 [C]."""
        s = self._get()
        return s.m2_x / s.n

    @property
    def std(self):
        """Population standard deviation of x, float64 [C]."""
        return self.var.sqrt()

    @property
    def mean_y(self):
        """Mean of y per feature, float64 [D]."""
        return self._need_y("mean_y").mean_y.clone()

    @property
    def var_y(self):
        """Population variance of y, float64 [D]."""
        s = self._need_y("var_y")
        return s.m2_y / s.n

    @property
    def std_y(self):
        """Population standard deviation of y, float64 [D]."""
        return self.var_y.sqrt()

    def cross_cov(self):
        """Population cross-covariance of x and y, float64 [C, D]."""
        s = self._need_y("cross_cov")
        return s.cxy / s.n

    def cross_corr(self):
        """Pearson correlation of each x unit with each y unit, float64 [C, D]; 0 where either is dead."""
        s = self._need_y("cross_corr")
        return _correlation(s.cxy, s.m2_x, s.m2_y)

    def cov(self):
        """Population covariance of x, float64 [C, C] (needs ``covariance=True``)."""
        if not self.covariance:
            raise ValueError("cov needs StreamingStats(..., covariance=True)")
        s = self._get()
        return s.cxx / s.n

    def corr(self):
        """Pearson correlation of x's units, float64 [C, C]; 0 where a unit is dead (needs ``covariance=True``)."""
        if not self.covariance:
            raise ValueError("corr needs StreamingStats(..., covariance=True)")
        s = self._get()
        return _correlation(s.cxx, s.m2_x, s.m2_x)

    def __repr__(self):
        extra = "" if self.other_features is None else f", other_features={self.other_features}"
        return f"StreamingStats(num_features={self.num_features}{extra}, covariance={self.covariance}, count={self.count})"


class _Shifted:
    """Running float64 sums of the "cpu" fast path: count ``n``, ``s = sum(x - shift)`` and
    ``ss = sum((x - shift)^2)`` per feature, on the CPU."""

    __slots__ = ("n", "shift", "s", "ss")

    def __init__(self, shift):
        self.n, self.shift = 0, shift
        self.s, self.ss = torch.zeros_like(shift), torch.zeros_like(shift)


def _first_values(x, outer, channels, inner):
    """The fast path's shift: each feature's first value in x viewed as [outer, C, inner], in
    float64. Cheap (C elements), and exact for a constant feature in every dtype (a float64 mean
    of float64 data may round), so its variance is exactly 0; a first value even 1e4 standard
    deviations from the mean costs only ~1e-8 relative accuracy (module docstring)."""
    # a fresh contiguous copy: float64 data would otherwise alias the caller's tensor
    return torch.empty(channels, dtype=torch.float64).copy_(x.view(outer, channels, inner)[0, :, 0])


def _feature_axis(t, name, features, feature_axis):
    """Check ``t`` (a float tensor with ``features`` along ``feature_axis``); the axis, non-negative."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in INPUT_DTYPES:
        raise ValueError(f"{name} has dtype {t.dtype}; expected float32, float16, bfloat16 or float64")
    nd = t.dim()
    rank = max(nd, 1)  # a 0-d tensor gets its (wrong-sized) "last dim" message below
    if isinstance(feature_axis, bool) or not isinstance(feature_axis, int) or not -rank <= feature_axis < rank:
        raise ValueError(f"feature_axis={feature_axis!r} is not an axis of {name} with shape {tuple(t.shape)}")
    axis = feature_axis % rank
    if nd < 1 or t.shape[axis] != features:
        where = "last dim" if feature_axis == -1 or axis == nd - 1 else f"axis {feature_axis}"
        raise ValueError(f"{name} has shape {tuple(t.shape)}: its {where} must be {features} features")
    return axis


def _other_dims(t, feature_axis):
    """``t``'s shape without its feature axis."""
    dims = list(t.shape)
    del dims[feature_axis]
    return tuple(dims)


def _positive_int(value, name):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value
