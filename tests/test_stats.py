"""StreamingStats: every backend against a one-shot float64 computation on the concatenated data."""
import pytest
import torch

from conftest import DTYPES, device_for, fast_backends
from nlmerge import kernels
from nlmerge.ops._checks import NonFiniteError
from nlmerge.ops.stats import StreamingStats

BACKENDS = [pytest.param("torch", id="torch")] + fast_backends()


def make_batches(sizes, c, d, dtype, generator, offset=1000.0, lead=()):
    """Paired batches x [*lead, m, c], y [*lead, m, d]; per-unit means ``offset`` times the spread,
    y partly correlated with x (so correlations are not all ~0)."""
    mu_x = offset * (1.0 + torch.rand(c, generator=generator, dtype=torch.float64))
    mu_y = -offset * (1.0 + torch.rand(d, generator=generator, dtype=torch.float64))
    mix = torch.randn(c, d, generator=generator, dtype=torch.float64) / c**0.5
    xs, ys = [], []
    for m in sizes:
        z = torch.randn(*lead, m, c, generator=generator, dtype=torch.float64)
        e = torch.randn(*lead, m, d, generator=generator, dtype=torch.float64)
        xs.append((z + mu_x).to(dtype))
        ys.append((z @ mix + 0.5 * e + mu_y).to(dtype))
    return xs, ys


def fp64_truth(xs, ys, c, d):
    x = torch.cat([t.reshape(-1, c) for t in xs]).double()
    y = torch.cat([t.reshape(-1, d) for t in ys]).double()
    both = torch.cat([x, y], dim=1).T
    cov = torch.cov(both, correction=0)
    corr = torch.corrcoef(both)
    return x, y, cov, corr


def accumulate(backend, xs, ys, c, d, covariance=True, device=None):
    s = StreamingStats(c, d, covariance=covariance, backend=backend)
    for x, y in zip(xs, ys):
        s.update(x.to(device) if device else x, y.to(device) if device else y)
    return s


def check_against_truth(s, xs, ys, c, d, corr_tol=1e-5):
    x, y, cov, corr = fp64_truth(xs, ys, c, d)
    assert s.count == x.shape[0]
    sd = cov.diagonal().sqrt()
    scale = torch.outer(sd, sd)
    # means: fp32 sums of the shifted data, so within 1e-6 of a standard deviation
    assert ((s.mean.cpu() - x.mean(0)).abs() <= 1e-6 * sd[:c] + 1e-12 * x.mean(0).abs()).all()
    assert ((s.mean_y.cpu() - y.mean(0)).abs() <= 1e-6 * sd[c:] + 1e-12 * y.mean(0).abs()).all()
    torch.testing.assert_close(s.var.cpu(), cov.diagonal()[:c], rtol=1e-5, atol=0)
    torch.testing.assert_close(s.var_y.cpu(), cov.diagonal()[c:], rtol=1e-5, atol=0)
    torch.testing.assert_close(s.std.cpu(), sd[:c], rtol=1e-5, atol=0)
    assert ((s.cross_cov().cpu() - cov[:c, c:]).abs() / scale[:c, c:]).max() < corr_tol
    assert ((s.cov().cpu() - cov[:c, :c]).abs() / scale[:c, :c]).max() < corr_tol
    assert (s.cross_corr().cpu() - corr[:c, c:]).abs().max() < corr_tol
    assert (s.corr().cpu() - corr[:c, :c]).abs().max() < corr_tol
    for t in (s.mean, s.var, s.cross_cov(), s.cross_corr(), s.cov(), s.corr()):
        assert t.dtype == torch.float64


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_fp64_one_shot(backend, dtype, generator):
    """Odd sizes, uneven batches, leading dims flattened; 16-bit data with a moderate offset (at
    mean 1000x std, bf16 cannot represent the spread at all), compared on the same rounded values."""
    device = device_for(backend)
    c, d = 13, 7
    offset = 1000.0 if dtype == torch.float32 else 8.0
    xs, ys = make_batches([17, 1, 40, 5], c, d, dtype, generator, offset=offset, lead=(3,))
    s = accumulate(backend, xs, ys, c, d, device=device)
    check_against_truth(s, xs, ys, c, d)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mean_1000x_std(backend, generator):
    """The accuracy bar: correlations within 1e-5 of float64 when the mean is 1000x the std, and
    an accumulation over many batches (where a one-shot fp32 E[xy] - E[x]E[y] is useless)."""
    device = device_for(backend)
    c, d = 9, 11
    xs, ys = make_batches([300, 257, 64, 301], c, d, torch.float32, generator, offset=1000.0)
    check_against_truth(accumulate(backend, xs, ys, c, d, device=device), xs, ys, c, d)
    # the naive formula in fp32 is far off on the same data: this test has teeth
    x, y, _, corr = fp64_truth(xs, ys, c, d)
    xf, yf = x.float(), y.float()
    naive = (xf.T @ yf) / x.shape[0] - torch.outer(xf.mean(0), yf.mean(0))
    assert (naive.double() / torch.outer(x.std(0, correction=0), y.std(0, correction=0)) - corr[:c, c:]).abs().max() > 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
def test_x_only(backend, generator):
    """Without a second stream and covariance: mean, var, std only."""
    device = device_for(backend)
    xs, _ = make_batches([10, 33], 5, 1, torch.bfloat16, generator, offset=3.0)
    s = StreamingStats(5, backend=backend)
    for x in xs:
        s.update(x.to(device))
    x = torch.cat(xs).double()
    torch.testing.assert_close(s.mean.cpu(), x.mean(0))
    torch.testing.assert_close(s.var.cpu(), x.var(0, correction=0), rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="other_features"):
        s.cross_corr()
    with pytest.raises(ValueError, match="covariance=True"):
        s.cov()


@pytest.mark.parametrize("backend", BACKENDS)
def test_merge_equals_one_accumulator(backend, generator):
    device = device_for(backend)
    c, d = 6, 4
    xs, ys = make_batches([11, 2, 29, 7, 13], c, d, torch.float32, generator, offset=100.0)
    whole = accumulate(backend, xs, ys, c, d, device=device)
    a = accumulate(backend, xs[:2], ys[:2], c, d, device=device)
    b = accumulate(backend, xs[2:], ys[2:], c, d, device=device)
    empty = StreamingStats(c, d, covariance=True)
    assert a.merge(b) is a and a.merge(empty) is a
    assert a.count == whole.count
    for name in ("mean", "var", "mean_y", "var_y"):
        torch.testing.assert_close(getattr(a, name), getattr(whole, name), rtol=1e-12, atol=1e-12)
    for name in ("cross_cov", "cross_corr", "cov", "corr"):
        torch.testing.assert_close(getattr(a, name)(), getattr(whole, name)(), rtol=1e-10, atol=1e-12)
    # merging into an empty accumulator copies; the merged-from accumulator is unchanged
    fresh = StreamingStats(c, d, covariance=True).merge(b)
    torch.testing.assert_close(fresh.cross_corr(), b.cross_corr())
    assert b.count == sum(x.shape[0] for x in xs[2:])
    check_against_truth(a, xs, ys, c, d)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dead_units_give_zero_not_nan(backend, generator):
    device = device_for(backend)
    x = torch.randn(50, 4, generator=generator) + 1000.0
    y = torch.randn(50, 3, generator=generator)
    x[:, 1] = 1234.567  # constant, not a short binary fraction: fp32 sums of it round
    y[:, 2] = 0.0  # all zero
    y[:, 0] = -0.1
    s = StreamingStats(4, 3, covariance=True, backend=backend)
    s.update(x[:20].to(device), y[:20].to(device)).update(x[20:].to(device), y[20:].to(device))
    cc, cx = s.cross_corr(), s.corr()
    assert torch.isfinite(cc).all() and torch.isfinite(cx).all()
    assert (cc[1] == 0).all() and (cc[:, 2] == 0).all() and (cc[:, 0] == 0).all()
    assert (cx[1] == 0).all() and (cx[:, 1] == 0).all()
    assert s.var[1] == 0 and s.var_y[2] == 0 and s.var_y[0] == 0
    torch.testing.assert_close(cx.diagonal()[[0, 2, 3]].cpu(), torch.ones(3, dtype=torch.float64))


@pytest.mark.parametrize("backend", BACKENDS)
def test_huge_values_stay_finite(backend, generator):
    """Spreads whose squares overflow fp32: fast backends redo the batch in float64."""
    device = device_for(backend)
    x = torch.randn(40, 3, generator=generator) * 1e25
    y = torch.randn(40, 2, generator=generator) * 1e-20
    s = StreamingStats(3, 2, backend=backend).update(x.to(device), y.to(device))
    ref = StreamingStats(3, 2, backend="torch").update(x, y)
    torch.testing.assert_close(s.var.cpu(), ref.var, rtol=1e-10, atol=0)
    torch.testing.assert_close(s.cross_corr().cpu(), ref.cross_corr(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_errors(backend, generator):
    device = device_for(backend)
    s = StreamingStats(4, 3, backend=backend)
    x = torch.randn(5, 4, device=device)
    y = torch.randn(5, 3, device=device)
    with pytest.raises(ValueError, match=r"^x has shape \(5, 3\)"):
        s.update(torch.randn(5, 3, device=device), y)
    with pytest.raises(ValueError, match=r"^y has shape \(5, 4\)"):
        s.update(x, torch.randn(5, 4, device=device))
    with pytest.raises(ValueError, match="y is required"):
        s.update(x)
    with pytest.raises(ValueError, match="leading dims"):
        s.update(x, torch.randn(6, 3, device=device))
    with pytest.raises(ValueError, match="y was given"):
        StreamingStats(4, backend=backend).update(x, y)
    with pytest.raises(ValueError, match="dtype"):
        s.update(x.to(torch.int64), y)
    with pytest.raises(TypeError):
        s.update(x.tolist(), y)
    s.update(x, y)
    for bad, name in ((float("nan"), "x"), (float("inf"), "y"), (-float("inf"), "x")):
        xb, yb = x.clone(), y.clone()
        (xb if name == "x" else yb)[2, 1] = bad
        with pytest.raises(NonFiniteError, match=f"^{name} contains") as info:
            s.update(xb, yb)
        assert info.value.tensor == name
    assert s.count == 5  # refused batches left the state alone
    for other in (StreamingStats(5, 3), StreamingStats(4, 2), StreamingStats(4), StreamingStats(4, 3, covariance=True)):
        with pytest.raises(ValueError, match="cannot merge"):
            s.merge(other)
    with pytest.raises(ValueError, match="no data"):
        StreamingStats(4).mean
    with pytest.raises(ValueError, match="num_features"):
        StreamingStats(0)


def test_fp64_inputs_and_state_device(generator):
    """float64 inputs take the float64 reference on every backend (mean 1e6x std: fp32 would lose
    it all); an empty batch is a no-op; the state lives on the asked device."""
    x = torch.randn(20, 3, generator=generator, dtype=torch.float64) * 1e-3 + 1e3
    s = StreamingStats(3, device="cpu").update(x).update(x[:0])
    assert s.count == 20 and s.mean.device.type == "cpu"
    torch.testing.assert_close(s.var, x.var(0, correction=0), rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_gram_folds_chunks(dtype, generator):
    """The kernel itself: several fp32 chunks folded into float64 and rows split over programs,
    mixed input dtypes and a strided x, against float64."""
    module, reason = kernels.load("triton")
    if module is None:
        pytest.skip(f"triton unavailable: {reason}")
    from nlmerge.kernels import triton_stats

    device = "cuda" if torch.cuda.is_available() else "cpu"
    big = torch.randn(150, 40, generator=generator).to(dtype)
    x = big[:, 3:38]  # row stride 40
    y = torch.randn(150, 5, generator=generator)
    shx = torch.randn(35, generator=generator)
    shy = torch.randn(5, generator=generator)
    x, y, shx, shy = (t.to(device) for t in (x, y, shx, shy))
    got, sx, sxx, sy, syy = triton_stats.centred_gram(x, y, shx, shy, chunk=32)
    xc, yc = x.double() - shx.double(), y.double() - shy.double()
    torch.testing.assert_close(got.cpu(), (xc.T @ yc).cpu(), rtol=1e-5, atol=1e-4)
    for a, b in ((sx, xc.sum(0)), (sxx, (xc * xc).sum(0)), (sy, yc.sum(0)), (syy, (yc * yc).sum(0))):
        torch.testing.assert_close(a.cpu(), b.cpu(), rtol=1e-5, atol=1e-4)
    s, ss = triton_stats.column_sums(x, shx, squares=True)
    torch.testing.assert_close(s.cpu(), (x.double() - shx.double()).sum(0).cpu(), rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(ss.cpu(), ((x.double() - shx.double()) ** 2).sum(0).cpu(), rtol=1e-12, atol=1e-9)


_COMPILE_SCRIPT = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from nlmerge.kernels import triton_stats as ts

gram_sig = {"x_ptr": "P", "y_ptr": "P", "shx_ptr": "*fp32", "shy_ptr": "*fp32", "out_ptr": "*fp64", "sx_ptr": "*fp64",
            "sy_ptr": "*fp64", "M": "i32", "C": "i32", "D": "i32", "stride_x": "i32", "stride_y": "i32", "S": "i32",
            "n_chunks": "i32", "XKIND": "constexpr", "YKIND": "constexpr", "BM": "constexpr", "BN": "constexpr",
            "BK": "constexpr", "CHUNK_ROWS": "constexpr"}
col_sig = {"x_ptr": "P", "shift_ptr": "*fp32", "out_ptr": "*fp64", "M": "i32", "C": "i32", "stride_x": "i32", "S": "i32",
           "KIND": "constexpr", "SHIFTED": "constexpr", "SQUARES": "constexpr", "BR": "constexpr", "BC": "constexpr"}
for kind, ptr in ((0, "*fp32"), (1, "*fp16"), (2, "*i16")):
    for fn, sig, consts in (
        (ts._gram_kernel, gram_sig, dict(XKIND=kind, YKIND=kind, BM=64, BN=64, BK=32, CHUNK_ROWS=1024)),
        (ts._colsum_kernel, col_sig, dict(KIND=kind, SHIFTED=True, SQUARES=True, BR=32, BC=128)),
    ):
        sig = {k: (ptr if v == "P" else v) for k, v in sig.items()}
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": 4, "enable_fp_fusion": True})
        ptx = k.asm["ptx"]
        if fn is ts._gram_kernel:
            assert "fma.rn.f32" in ptx and "tf32" not in ptx and "mma" not in ptx, "the Gram must use IEEE fp32 FMAs"
print("ok")
"""


def test_triton_kernels_compile_for_sm90():
    """Without a GPU the interpreter cannot catch compiled-mode errors: compile both kernels for
    sm_90 (H100) in a process without TRITON_INTERPRET, and check that the Gram's products are
    IEEE fp32 FMAs, not TF32 tensor-core MMAs."""
    import os
    import subprocess
    import sys

    if kernels.load("triton")[0] is None:
        pytest.skip("triton unavailable")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


# ---------------------------------------------------------------- feature_axis and the "cpu" fast path
# (means and variances only: the C++ channel_stats kernel updates shifted float64 sums in place)

ALL_DTYPES = DTYPES + (torch.float64,)
needs_cpu = pytest.mark.skipif(kernels.load("cpu")[0] is None, reason="C++ extension not built")


def conv_batches(sizes, shape, dtype, generator, offset):
    """NCHW-like batches [m, C, *spatial] with per-channel means ``offset`` times the spread."""
    mu = offset * (1.0 + torch.rand(shape[0], generator=generator, dtype=torch.float64))
    mu = mu.reshape(-1, *([1] * (len(shape) - 1)))
    return [(torch.randn(m, *shape, generator=generator, dtype=torch.float64) + mu).to(dtype) for m in sizes]


def channel_truth(xs):
    """float64 mean and population variance per channel (axis 1) of the concatenated batches."""
    x = torch.cat([t.double() for t in xs]).movedim(1, -1).reshape(-1, xs[0].shape[1])
    return x.mean(0), x.var(0, correction=0), x.shape[0]


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1, 1), (5, 3, 7), (1, 9, 1), (4, 2, 3, 5), (16,)], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_feature_axis_matches_fp64(backend, shape, dtype, generator):
    """Features at axis 1 of [m, C, ...] (and [m, C]); sizes 1 and odd; every dtype; fp16/bf16 data
    with a moderate offset, compared on the same rounded values."""
    device = device_for(backend)
    offset = 1000.0 if dtype in (torch.float32, torch.float64) else 8.0
    xs = conv_batches([3, 1, 8], shape, dtype, generator, offset)
    s = StreamingStats(shape[0], backend=backend)
    for x in xs:
        s.update(x.to(device), feature_axis=1)
    mean, var, n = channel_truth(xs)
    assert s.count == n
    sd = var.sqrt()
    assert ((s.mean.cpu() - mean).abs() <= 1e-6 * sd + 1e-12 * mean.abs()).all()
    torch.testing.assert_close(s.var.cpu(), var, rtol=1e-5, atol=0)


@needs_cpu
@pytest.mark.parametrize("shape", [(7,), (6, 5, 3), (2, 3, 2, 4)], ids=str)
def test_fast_path_mean_1000x_std(shape, generator):
    """fp32 activations with means 1000x their spread, many uneven batches: variances within 1e-6
    (relative) of float64, means within 1e-9 of a standard deviation."""
    xs = conv_batches([64, 1, 33, 200, 7], shape, torch.float32, generator, 1000.0)
    s = StreamingStats(shape[0], backend="cpu")
    for x in xs:
        s.update(x, feature_axis=1)
    mean, var, _ = channel_truth(xs)
    assert ((s.var - var).abs() / var).max() < 1e-6
    assert ((s.mean - mean).abs() / var.sqrt()).max() < 1e-9


@needs_cpu
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_fast_path_constant_channel_has_zero_variance(dtype, generator):
    """A dead unit stays dead: a constant channel (not a short binary fraction) has variance
    exactly 0 over many batches, also after a read in between."""
    for shape, axis in (((4, 5), -1), ((4, 3, 6, 2), 1)):
        s = StreamingStats(shape[axis], backend="cpu")
        for i, m in enumerate((20, 1, 7)):
            x = torch.randn(m, *shape[1:], generator=generator).to(dtype)
            x.select(axis, 1).fill_(1234.567)
            s.update(x, feature_axis=axis)
            if i == 1:
                assert s.var[1] == 0
        assert s.var[1] == 0 and s.std[1] == 0 and s.mean[1] == torch.tensor(1234.567, dtype=dtype).double()
        assert (s.var[torch.arange(shape[axis]) != 1] > 0).all()


@needs_cpu
def test_fast_path_update_read_update(generator):
    """Reads fold the running sums; later updates go on from there; merges mix both paths."""
    xs = conv_batches([10, 3, 25, 4, 9], (5, 3, 4), torch.float32, generator, 300.0)
    mean, var, n = channel_truth(xs)
    s = StreamingStats(5, backend="cpu")
    s.update(xs[0], feature_axis=1)
    assert s.count == 10 * 3 * 4  # rows: every position of every sample
    for x in xs[1:]:
        first = s.mean.clone(), s.var.clone()
        s.update(x, feature_axis=1)
        assert not torch.equal(first[0], s.mean)
    assert s.count == n
    torch.testing.assert_close(s.mean, mean, rtol=1e-12, atol=0)
    torch.testing.assert_close(s.var, var, rtol=1e-9, atol=0)
    # a fast-path accumulator merged with a reference one, in both directions, and a fresh one
    fast = StreamingStats(5, backend="cpu")
    ref = StreamingStats(5, backend="torch")
    for i, x in enumerate(xs):
        (fast if i % 2 else ref).update(x, feature_axis=1)
    fast_count = fast.count
    both = [StreamingStats(5, backend="cpu").merge(fast).merge(ref), ref.merge(fast)]
    assert fast.count == fast_count
    for m in both:
        assert m.count == n
        torch.testing.assert_close(m.mean, mean, rtol=1e-12, atol=0)
        torch.testing.assert_close(m.var, var, rtol=1e-9, atol=0)
    fast.update(xs[0], feature_axis=1)  # merged-from fast accumulator keeps working
    assert fast.count == fast_count + xs[0].shape[0] * 12


@needs_cpu
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=str)
def test_fast_path_nonfinite_leaves_state(bad, dtype, generator):
    for shape, axis in (((6, 4), -1), ((3, 4, 5, 5), 1)):
        x = torch.randn(shape, generator=generator).to(dtype)
        xb = x.clone()
        xb.view(-1)[7] = bad
        s = StreamingStats(shape[axis], backend="cpu")
        with pytest.raises(NonFiniteError, match="^x contains") as info:
            s.update(xb, feature_axis=axis)  # the first batch: no shift may be kept from it
        assert info.value.tensor == "x" and s.count == 0
        s.update(x, feature_axis=axis)
        before = s.count, s.mean, s.var
        for _ in range(2):  # before and after a fold
            with pytest.raises(NonFiniteError, match="^x contains"):
                s.update(xb, feature_axis=axis)
            assert s.count == before[0]
            assert torch.equal(s.mean, before[1]) and torch.equal(s.var, before[2])
        s.update(x, feature_axis=axis)
        ref = StreamingStats(shape[axis], backend="torch").update(x, feature_axis=axis).update(x, feature_axis=axis)
        torch.testing.assert_close(s.var, ref.var, rtol=1e-9, atol=1e-12)


@needs_cpu
def test_fast_path_layouts_and_fp64_overflow(generator):
    """Non-contiguous and channels_last inputs; float64 data whose squares overflow float64 take
    the reference for that batch (as the reference backend does)."""
    x = torch.randn(6, 5, 4, 3, generator=generator) * 2 + 10
    ref = StreamingStats(5, backend="torch").update(x, feature_axis=1)
    for layout in (x.to(memory_format=torch.channels_last), x.transpose(2, 3), x[:, :, ::2]):
        s = StreamingStats(5, backend="cpu").update(layout, feature_axis=1)
        r = StreamingStats(5, backend="torch").update(layout, feature_axis=1)
        torch.testing.assert_close(s.var, r.var, rtol=1e-12, atol=0)
        torch.testing.assert_close(s.mean, r.mean, rtol=1e-12, atol=0)
    torch.testing.assert_close(StreamingStats(5, backend="cpu").update(x, feature_axis=1).var, ref.var, rtol=1e-12, atol=0)
    z = torch.randn(8, 5, generator=generator, dtype=torch.float64)
    s, r = StreamingStats(5, backend="cpu").update(z), StreamingStats(5, backend="torch").update(z)
    z.add_(1e6)  # the caller reuses its buffer: the state keeps no view of it
    torch.testing.assert_close(s.mean, r.mean, rtol=1e-12, atol=0)
    huge = torch.randn(30, 2, generator=generator, dtype=torch.float64) * 1e200
    s = StreamingStats(2, backend="cpu").update(huge[:10]).update(huge[10:])
    r = StreamingStats(2, backend="torch").update(huge[:10]).update(huge[10:])
    assert s.count == 30
    torch.testing.assert_close(s.mean, r.mean, rtol=1e-12, atol=0)
    torch.testing.assert_close(s.var, r.var, rtol=1e-12, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_feature_axis_errors(backend, generator):
    device = device_for(backend)
    x = torch.randn(2, 4, 3, 3, device=device)
    s = StreamingStats(4, backend=backend)
    with pytest.raises(ValueError, match=r"^x has shape \(2, 4, 3, 3\): its last dim must be 4 features"):
        s.update(x)
    with pytest.raises(ValueError, match=r"^x has shape \(2, 4, 3, 3\): its axis 2 must be 4 features"):
        s.update(x, feature_axis=2)
    for bad in (4, -5, 1.0, True):
        with pytest.raises(ValueError, match=rf"^feature_axis={bad!r} is not an axis of x with shape \(2, 4, 3, 3\)"):
            s.update(x, feature_axis=bad)
    assert s.update(x, feature_axis=-3).count == 18
    paired = StreamingStats(4, 2, backend=backend)
    with pytest.raises(ValueError, match="leading dims"):
        paired.update(x, torch.randn(2, 2, 3, 4, device=device), feature_axis=1)
    y = torch.randn(2, 2, 3, 3, device=device)
    paired.update(x, y, feature_axis=1)
    ref = StreamingStats(4, 2, backend="torch").update(x.movedim(1, -1).cpu(), y.movedim(1, -1).cpu())
    torch.testing.assert_close(paired.cross_cov().cpu(), ref.cross_cov(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inputs_that_require_grad(backend, generator):
    """Activations straight from a model in training mode (requires_grad) are read like any other."""
    device = device_for(backend)
    x = torch.randn(5, 3, 4, 4, generator=generator).to(device).requires_grad_()
    y = torch.randn(5, 2, 4, 4, generator=generator).to(device).requires_grad_()
    plain = StreamingStats(3, backend=backend).update(x, feature_axis=1)
    truth = x.detach().double().movedim(1, -1).reshape(-1, 3).cpu()
    torch.testing.assert_close(plain.var.cpu(), truth.var(0, unbiased=False), rtol=1e-5, atol=1e-7)
    paired = StreamingStats(3, 2, covariance=True, backend=backend).update(x, y, feature_axis=1)
    torch.testing.assert_close(paired.mean.cpu(), truth.mean(0), rtol=1e-5, atol=1e-7)
