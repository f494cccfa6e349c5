"""Exact magnitude selection: every fast backend equals the kthvalue reference bit for bit."""
import pytest
import torch

from nlmerge import ops
from conftest import DTYPES, KINDS, device_for, fast_backends, max_size, nasty

SIZES = (1, 7, 4097, 1_000_003)


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
