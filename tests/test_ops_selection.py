"""Exact magnitude selection: every fast backend equals the kthvalue reference bit for bit."""
import pytest
import torch

from nlmerge import ops
from nlmerge.ops import selection
from conftest import DTYPES, KINDS, device_for, fast_backends, max_size, nasty

SIZES = (1, 7, 4097, 1_000_003)


@pytest.fixture(autouse=True)
def one_read_at_every_size(monkeypatch):
    """The one-read path serves only large selections (ONE_READ_MIN_ELEMENTS); here it runs at the
    tests' small sizes too (the two histogram passes are its fallback, tested by forcing misses)."""
    monkeypatch.setattr(selection, "ONE_READ_MIN_ELEMENTS", 1)


@pytest.mark.parametrize("backend", fast_backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("kind", KINDS)
def test_threshold_equals_reference(backend, dtype, size, kind, generator):
    if size > max_size(backend):
        pytest.skip("size too large for Triton's interpreter")
    x = nasty(kind, (size,), dtype, generator).to(device_for(backend))
    for keep in (0.2, 0.5, 0.9, 1e-9, 0.999999):
        expected = ops.magnitude_threshold(x.cpu(), keep, backend="torch")
        actual = ops.magnitude_threshold(x, keep, backend=backend)
        assert actual.dtype == dtype and actual.shape == ()
        assert torch.equal(actual.cpu(), expected), (keep, actual, expected)
    for k in {1, size, int(torch.randint(1, size + 1, (), generator=generator))}:
        expected = ops.kth_smallest_magnitude(x.cpu(), k, backend="torch")
        assert torch.equal(ops.kth_smallest_magnitude(x, k, backend=backend).cpu(), expected), k


@pytest.mark.parametrize("backend", fast_backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_global_threshold_over_several_tensors(backend, dtype, generator):
    device = device_for(backend)
    shapes = [(3, 5), (1,), (64, 33), (2, 3, 7)] if backend == "triton" else [(300, 7), (1,), (4097,), (64, 33, 3)]
    xs = [nasty("mixed", s, dtype, generator).to(device) for s in shapes]
    xs[1] = xs[1].t() if xs[1].dim() == 2 else xs[1]
    xs.append(nasty("normal", (40, 30), dtype, generator).to(device).t())  # not contiguous
    for keep in (0.1, 0.2, 0.7):
        expected = ops.magnitude_threshold([x.cpu() for x in xs], keep, backend="torch")
        concatenated = torch.cat([x.reshape(-1).cpu() for x in xs])
        assert torch.equal(expected, ops.magnitude_threshold(concatenated, keep, backend="torch"))
        assert torch.equal(ops.magnitude_threshold(xs, keep, backend=backend).cpu(), expected)


def test_reference_is_the_ties_recipe(generator):
    x = torch.randn(1001, generator=generator)
    d = x.numel()
    for keep in (0.2, 0.5):
        k = d - int(d * keep)
        assert torch.equal(ops.magnitude_threshold(x, keep, backend="torch"), x.abs().kthvalue(k).values)
        kept = (x.abs() >= ops.magnitude_threshold(x, keep, backend="torch")).sum()
        assert kept == int(d * keep) + 1  # no ties among randn magnitudes


@pytest.mark.parametrize("backend", ["torch", *fast_backends()])
def test_threshold_bad_input(backend):
    device = device_for(backend)
    x = torch.randn(100, device=device)
    assert ops.magnitude_threshold(x, 1.0, backend=backend).item() == 0.0
    assert ops.magnitude_threshold(x, 3.0, backend=backend).item() == 0.0
    for keep in (0.0, -0.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=rf"keep must be (> 0 .*|finite), got {keep}"):
            ops.magnitude_threshold(x, keep, backend=backend)
    for bad in (float("nan"), float("inf"), -float("inf")):
        y = x.clone()
        y[17] = bad
        with pytest.raises(ops.NonFiniteError, match=r"x\[1\]"):
            ops.magnitude_threshold([x, y], 0.2, backend=backend)
        with pytest.raises(ValueError, match="NaN or Inf"):
            ops.magnitude_threshold(y, 1.0, backend=backend)
    with pytest.raises(ValueError, match=r"x\[1\] has dtype torch.float16 but x\[0\] has dtype torch.float32"):
        ops.magnitude_threshold([x, x.half()], 0.2, backend=backend)
    with pytest.raises(ValueError, match="no elements"):
        ops.magnitude_threshold(x[:0], 0.2, backend=backend)
    with pytest.raises(ValueError, match="dtype torch.int64"):
        ops.magnitude_threshold(torch.arange(5, device=device), 0.2, backend=backend)
    for k in (0, 101, 2.5, True):
        with pytest.raises(ValueError, match=rf"k must be an integer in \[1, 100\], got {k!r}"):
            ops.kth_smallest_magnitude(x, k, backend=backend)


# ---- one read: sample -> bracket -> count_window; the histogram passes when the sample misses ----

def _models(kind, n, dtype, generator):
    base = nasty("normal", (n,), dtype, generator)
    return base, (base.float() + nasty(kind, (n,), dtype, generator).float()).to(dtype)


@pytest.mark.parametrize("backend", fast_backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_models_threshold_equals_reference(backend, dtype, kind, generator):
    """The one-read path of the models form (task vectors in registers) on nasty task vectors."""
    n = 4097 if backend == "triton" else 300_007
    base, expert = (t.to(device_for(backend)) for t in _models(kind, n, dtype, generator))
    for k in (1, n, int(torch.randint(1, n + 1, (), generator=generator))):
        expected = ops.kth_smallest_magnitude_models(base.cpu(), expert.cpu(), k, backend="torch")
        assert torch.equal(ops.kth_smallest_magnitude_models(base, expert, k, backend=backend).cpu(), expected), k
    for keep in (0.2, 0.9):
        expected = ops.magnitude_threshold_models(base.cpu(), expert.cpu(), keep, backend="torch")
        assert torch.equal(ops.magnitude_threshold_models(base, expert, keep, backend=backend).cpu(), expected)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_count_window_kernel_equals_torch(dtype, generator):
    """The fused window count equals the torch form: windows around, below, above and over the data,
    non-finite values counted (x: fp32; models: every dtype), sizes across the one-thread cut."""
    cpu = pytest.importorskip("nlmerge.kernels.cpu")
    if not cpu.available:
        pytest.skip("cpu backend unavailable")
    for n in (1, 1000, 300_001):
        base, expert = _models("mixed", n, dtype, generator)
        expert[n // 2] = float("inf")
        tau = (expert.float() - base.float()).contiguous()
        bits = selection._fp32_bits(tau)
        pick = int(bits[int(torch.randint(0, n, (), generator=generator))])
        for lo, width in ((pick, 1), (pick - 5000, 10_000), (0, 1 << 16), (0x7F7F0000, 1 << 16), (0x3F000000, 3)):
            lo = min(max(lo, 0), 0x7F800000 - width)
            expected = torch.zeros(width + 1, dtype=torch.int64)
            nonfinite = selection.count_window(None, tau, expected, lo)
            assert nonfinite == int((~tau.isfinite()).sum()) > 0
            got = torch.full((width + 1,), 7, dtype=torch.int64)
            got -= 7  # the kernel accumulates
            assert cpu.count_window_models(base, expert, got, lo) == nonfinite
            assert torch.equal(got, expected), (n, lo, width)
            got.zero_()
            assert cpu.count_window(tau, got, lo) == nonfinite
            assert torch.equal(got, expected)
    with pytest.raises(ValueError, match="finite fp32 magnitudes"):
        cpu.count_window(tau, torch.zeros(3, dtype=torch.int64), 0x7F7FFFFF)


def _against_sample(n, dtype, generator):
    """Data built against the op's sample: small magnitudes everywhere, large at the sampled positions."""
    x = torch.rand(n, generator=generator) * 1e-3
    x[selection.sample_positions(n, selection.sample_stride(n))] = 100.0 + torch.rand(1, generator=generator)
    return x.to(dtype)


@pytest.mark.parametrize("backend", [p for p in fast_backends() if p.id == "cpu"])
def test_fallback_when_the_sample_misses(backend, generator, caplog):
    n = 300_007
    x = _against_sample(n, torch.float32, generator)
    base = torch.randn(n, generator=generator).bfloat16()
    expert = (base.float() + _against_sample(n, torch.float32, generator)).bfloat16()
    with caplog.at_level("DEBUG", logger="nlmerge"):
        for keep in (0.2, 0.7):
            assert torch.equal(ops.magnitude_threshold(x, keep, backend=backend),
                               ops.magnitude_threshold(x, keep, backend="torch"))
            assert torch.equal(ops.magnitude_threshold_models(base, expert, keep, backend=backend),
                               ops.magnitude_threshold_models(base, expert, keep, backend="torch"))
    assert sum("bracket missed" in r.getMessage() for r in caplog.records) == 4


def test_one_read_hits_on_ordinary_data():
    """Fixed data (the hit is probabilistic; exactness is tested on fresh data above)."""
    cpu = pytest.importorskip("nlmerge.kernels.cpu")
    if not cpu.available:
        pytest.skip("cpu backend unavailable")
    x = torch.randn(1_000_003, generator=torch.Generator().manual_seed(0))
    d = x.numel()
    for keep in (0.2, 0.5, 0.9):
        k = d - int(d * keep)
        found = selection._one_read([x], [d], k, selection.add_sample,
                                    lambda t, hist, lo: selection.count_window(cpu, t, hist, lo))
        assert found == int(ops.kth_smallest_magnitude(x, k, backend="torch").view(torch.int32))


def test_sample_positions():
    for n, stride in ((1, 1), (7, 3), (1000, 7), (4096, 4096), (5, 100)):
        pos = selection.sample_positions(n, stride, seed=3)
        assert pos.dtype == torch.int64 and pos.numel() == -(-n // stride)
        assert torch.equal(pos // stride, torch.arange(pos.numel())) and int(pos.max()) < n
        assert torch.equal(pos, selection.sample_positions(n, stride, seed=3))
    assert not torch.equal(selection.sample_positions(10**6, 64, 0), selection.sample_positions(10**6, 64, 1))


def _stream(selector, base, experts_parts, step):
    for b, e in zip(base, experts_parts):
        getattr(selector, step)(b, e)


@pytest.mark.parametrize("backend", ["torch", *fast_backends()])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_selector_one_read_split_over_processes(backend, dtype, generator):
    """Two 'processes' each sample and count their own tensors; summing their counts (what the job
    all-reduces) gives the reference threshold; the histogram fallback gives it too."""
    device = device_for(backend)
    sizes = (3000, 1, 5001, 777) if backend == "triton" else (300_001, 1, 70_001, 4097)
    pairs = [tuple(t.to(device) for t in _models("mixed", n, dtype, generator)) for n in sizes]
    d = sum(sizes)
    for keep in (0.2, 0.9):
        k = d - int(d * keep)
        expected = ops.kth_smallest_magnitude_models([b.cpu() for b, _ in pairs], [e.cpu() for _, e in pairs], k,
                                                     backend="torch")
        ranks = [ops.MagnitudeSelector(device, backend=backend, sample_stride=64) for _ in range(2)]
        shares = [pairs[::2], pairs[1::2]]
        for sel, share in zip(ranks, shares):
            for b, e in share:
                sel.sample_models(b, e)
        ranks[0].add(ranks[1])  # all-reduce of sample_counts
        ranks[1].sample_counts.copy_(ranks[0].sample_counts)
        assert ranks[0].sampled_numel == d
        for sel, share in zip(ranks, shares):
            sel.bracket(k)
            for b, e in share:
                sel.count_window_models(b, e)
        total = ops.MagnitudeSelector(device, backend=backend, sample_stride=64)
        total.sample_counts.copy_(ranks[0].sample_counts)
        total.bracket(k)
        for sel in ranks:
            total.add(sel)
        if total.hit:
            assert torch.equal(total.threshold().cpu(), expected)
        for b, e in pairs:  # the fallback passes agree
            total.count_models(b, e)
        total.locate(k)
        for b, e in pairs:
            total.count_low_models(b, e)
        assert torch.equal(total.threshold().cpu(), expected)


@pytest.mark.parametrize("backend", ["torch", *fast_backends()])
def test_selector_fallback_when_the_sample_misleads(backend, generator):
    """A sample of other data (10x larger) brackets the wrong place: no hit, and the fallback is exact."""
    device = device_for(backend)
    x = torch.randn(5001, generator=generator).to(device)
    sel = ops.MagnitudeSelector(device, backend=backend, sample_stride=16)
    sel.sample(10 * x)
    sel.bracket(2500)
    with pytest.raises(RuntimeError, match="no threshold yet"):
        sel.count_window(x) or sel.threshold()
    assert not sel.hit
    sel.count(x)
    sel.locate(2500).count_low(x)
    assert torch.equal(sel.threshold().cpu(), ops.kth_smallest_magnitude(x.cpu(), 2500, backend="torch"))


@pytest.mark.parametrize("backend", ["torch", *fast_backends()])
def test_selector_one_read_errors(backend):
    device = device_for(backend)
    x = torch.randn(100, device=device)
    sel = ops.MagnitudeSelector(device, backend=backend)
    with pytest.raises(RuntimeError, match=r"call bracket\(k\)"):
        sel.count_window(x)
    sel.sample(x)
    for k in (0, 101, 2.5):
        with pytest.raises(ValueError, match=r"k must be an integer in \[1, 100\]"):
            sel.bracket(k)
    y = x.clone()
    y[3] = float("nan")
    with pytest.raises(ops.NonFiniteError, match="y"):
        sel.bracket(50).count_window(y, "y")
    with pytest.raises(ops.NonFiniteError, match="expert"):
        sel.count_window_models(x, y)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="sample_stride"):
            ops.MagnitudeSelector(device, backend=backend, sample_stride=bad)
