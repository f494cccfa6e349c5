"""The C++ extension's own guarantees: exact dtype conversions and results that do not depend
on the number of OpenMP threads."""
import numpy as np
import pytest
import torch

from nlmerge import kernels, ops
from conftest import nasty

cpu, reason = kernels.load("cpu")
pytestmark = pytest.mark.skipif(cpu is None, reason=f"C++ extension not built: {reason}")
HALF = {"float16": torch.float16, "bfloat16": torch.bfloat16}


@pytest.mark.parametrize("name", sorted(HALF))
def test_16bit_to_fp32_every_pattern(name):
    from nlmerge import _C

    bits = np.arange(1 << 16, dtype=np.uint16)
    expected = torch.from_numpy(bits.view(np.int16).copy()).view(HALF[name]).float().numpy().view(np.uint32)
    for convert in (lambda out: _C.convert(bits, name, out, "float32"), lambda out: _C.load_simd(bits, name, out)):
        out = np.empty(1 << 16, np.float32)
        convert(out)
        assert np.array_equal(out.view(np.uint32), expected)


@pytest.mark.parametrize("name", sorted(HALF))
def test_fp32_to_16bit_rounds_like_torch(name, generator):
    from nlmerge import _C

    seed = int(torch.randint(0, 2**31, (), generator=generator))
    rng = np.random.default_rng(seed)
    # random bit patterns, every 16-bit value's fp32 and its rounding midpoints, fp16 edges
    neighbours = (np.arange(1 << 16, dtype=np.uint64) << 16)[:, None] + np.array([0, 1, 0x7FFF, 0x8000, 0x8001, 0xFFFF])
    edges = np.array([65504, 65519.996, 65520, 2**-24, 2**-25, 3 * 2**-26, 1e-40, 3.4e38], np.float32).view(np.uint32)
    patterns = np.concatenate([
        rng.integers(0, 2**32, 1 << 20, dtype=np.uint64), neighbours.reshape(-1), edges, edges | 0x80000000,
    ]).astype(np.uint32)
    x = patterns.view(np.float32)
    x = x[~np.isnan(x)]  # NaN payloads differ between torch's own code paths; NaN-ness is tested elsewhere
    out = np.empty(len(x), np.uint16)
    _C.convert(x, "float32", out, name)
    expected = torch.from_numpy(x.copy()).to(HALF[name]).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(out, expected)


def test_results_do_not_depend_on_thread_count(generator):
    threads = torch.get_num_threads()
    tv = torch.stack([nasty(kind, (300_001,), torch.float32, generator) for kind in ("mixed", "normal", "ties")])
    mtl = ops.task_arithmetic(tv, backend="torch")
    thr = [ops.magnitude_threshold(tau, 0.3, backend="torch") for tau in tv]
    results = []
    try:
        for n in (1, 2, 3, 5):
            torch.set_num_threads(n)
            results.append([
                ops.magnitude_threshold(list(tv), 0.2, backend="cpu"),
                ops.ties_merge(tv, thr, base=mtl, lam=0.7, backend="cpu"),
                ops.task_arithmetic(tv, weights=[0.3, -1.2, 2.0], backend="cpu"),
                ops.tall_masks(tv, mtl, [0.2, 0.4, 1.0], backend="cpu"),
                ops.consensus_merge(tv, mtl, 0.4, backend="cpu"),
            ])
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


STATS_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# [outer, C, inner] views: features last [M, C], NCHW, NCDHW; sizes 1, odd, C = 1, runs with and
# without a vector tail, and enough data for several work items
STATS_SHAPES = ((1, 1), (37, 1), (300, 13), (70_000, 3), (1, 1, 1, 1), (3, 1, 5, 7), (2, 5, 9, 11), (64, 16, 32, 32),
                (2, 3, 4, 5, 7), (1, 1, 3, 2, 1))


def geometry(shape):
    """(outer, C, inner) of an activation: features last for 2-D, channels at axis 1 otherwise."""
    if len(shape) == 2:
        return shape[0], shape[1], 1
    return shape[0], shape[1], int(np.prod(shape[2:]))


@pytest.mark.parametrize("dtype", STATS_DTYPES, ids=str)
@pytest.mark.parametrize("shape", STATS_SHAPES, ids=str)
def test_channel_stats_matches_fp64(shape, dtype, generator):
    """Shifted sums added in place into existing float64 sums, against float64 on the same values."""
    outer, c, inner = geometry(shape)
    mean = 50.0 * torch.randn(c, generator=generator, dtype=torch.float64)
    x = (torch.randn(outer, c, inner, generator=generator, dtype=torch.float64) + mean[:, None]).to(dtype).reshape(shape)
    shift = mean + torch.randn(c, generator=generator, dtype=torch.float64)
    s0, ss0 = torch.randn(c, generator=generator, dtype=torch.float64), torch.rand(c, generator=generator, dtype=torch.float64)
    s, ss = s0.clone(), ss0.clone()
    assert cpu.channel_stats(x, outer, inner, shift, s, ss) is True
    d = x.double().reshape(outer, c, inner) - shift[:, None]
    torch.testing.assert_close(s, s0 + d.sum(dim=(0, 2)), rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(ss, ss0 + (d * d).sum(dim=(0, 2)), rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("dtype", STATS_DTYPES, ids=str)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=str)
def test_channel_stats_nonfinite_leaves_sums(bad, dtype, generator):
    for shape, at in (((40, 6), (39, 5)), ((3, 4, 9, 9), (1, 2, 8, 0))):
        outer, c, inner = geometry(shape)
        x = torch.randn(shape, generator=generator).to(dtype)
        x[at] = bad
        s, ss = torch.ones(c, dtype=torch.float64), torch.ones(c, dtype=torch.float64)
        assert cpu.channel_stats(x, outer, inner, torch.zeros(c, dtype=torch.float64), s, ss) is False
        assert (s == 1).all() and (ss == 1).all()


def test_channel_stats_binding_checks():
    from nlmerge import _C

    x = np.zeros(12, np.float32)
    k, s, ss = np.zeros(3), np.zeros(3), np.zeros(3)
    with pytest.raises(ValueError, match="'float64'"):
        _C.channel_stats(x, "int8", 4, 3, 1, k, s, ss)
    with pytest.raises(ValueError, match="x has 12 elements, expected 15"):
        _C.channel_stats(x, "float32", 5, 3, 1, k, s, ss)
    with pytest.raises(ValueError, match="sumsq has 2 elements"):
        _C.channel_stats(x, "float32", 4, 3, 1, k, s, np.zeros(2))
    with pytest.raises(ValueError, match="different arrays"):
        _C.channel_stats(x, "float32", 4, 3, 1, k, s, s)
    with pytest.raises(ValueError, match="channels >= 1"):
        _C.channel_stats(x, "float32", 12, 0, 1, k[:0], s[:0], ss[:0])


def test_channel_stats_do_not_depend_on_thread_count(generator):
    threads = torch.get_num_threads()
    inputs = [torch.randn(shape, generator=generator) * 3 + 7 for shape in ((20_000, 37), (64, 8, 33, 31), (3, 2, 400_001))]
    results = []
    try:
        for n in (1, 2, 3, 5):
            torch.set_num_threads(n)
            out = []
            for x in inputs:
                outer, c, inner = geometry(tuple(x.shape))
                s, ss = torch.zeros(c, dtype=torch.float64), torch.zeros(c, dtype=torch.float64)
                cpu.channel_stats(x, outer, inner, torch.full((c,), 6.5, dtype=torch.float64), s, ss)
                out += [s, ss]
            results.append(out)
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))
