"""DARE over the models (nlmerge.ops.dare, the ``random_keep`` of the models merge kernels, and
merge.generalized's fused DARE path): kernels against their references bit for bit, the same
bits on 1 and 2 threads, the fused path against the masked-task-vector path (which
test_generalized holds to mergekit), non-finite inputs named."""
import itertools
import math

import pytest
import torch
from conftest import DTYPES, KINDS, nasty

from nlmerge import kernels, ops
from nlmerge.merge import METHODS, generalized, merge_tensor
from nlmerge.ops.dare import BLOCK, l1_norm
from nlmerge.ops.random import keep_mask

needs_cpu = pytest.mark.skipif(kernels.load("cpu")[0] is None, reason="the C++ extension is not built")
SIZES = (1, 15, BLOCK - 1, BLOCK + 1, 3 * BLOCK + 17, 40_013)
DENSITIES = ((0.3, 1.0, 1e-4), (0.9, 0.5, 0.05))


def models(kind, n, dtype, generator, num=3):
    """A base and ``num`` experts of ``n`` elements of ``kind`` (experts: halves of the base plus
    another such tensor, so that they fit ``dtype``)."""
    base = nasty(kind, (n,), dtype, generator)
    return base, [(0.5 * base.float() + 0.5 * nasty(kind, (n,), dtype, generator).float()).to(dtype)
                  for _ in range(num)]


def threads(n, fn):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


def outcome(fn):
    """``fn()``'s tensor, or its ValueError's type and message (both paths must fail alike)."""
    try:
        return fn()
    except ValueError as err:
        return type(err), str(err)


def assert_same(a, b):
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a.view(-1).view(torch.uint8), b.view(-1).view(torch.uint8))
    else:
        assert a == b


def test_l1_norm_is_an_accurate_fixed_order_fp64_sum(generator):
    for kind, n in itertools.product(("normal", "denormal", "huge", "mixed"), (1, BLOCK + 5, 70_001)):
        x = nasty(kind, (n,), torch.float32, generator)
        exact = math.fsum(x.abs().double().tolist())
        got = float(l1_norm(x))
        assert abs(got - exact) <= (68 + math.log2(n)) * 2.0**-53 * exact, (kind, n)
        assert float(l1_norm(x.flip(0))) == pytest.approx(exact, rel=1e-13)  # another order: close, not defined equal
    assert float(l1_norm(torch.zeros(0))) == 0.0


@needs_cpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_keep_l1_norms_kernel_is_the_reference(dtype, generator):
    for n, densities, kind in itertools.product(SIZES, DENSITIES, ("normal", "mixed", "ties")):
        base, experts = models(kind, n, dtype, generator)
        keep = ops.RandomKeep(11, f"layer.{n}", densities)
        expected = ops.keep_l1_norms_models(base, experts, keep, backend="torch")
        one = threads(1, lambda: ops.keep_l1_norms_models(base, experts, keep, backend="cpu"))
        two = threads(2, lambda: ops.keep_l1_norms_models(base, experts, keep, backend="cpu"))
        assert torch.equal(one, expected) and torch.equal(two, expected), (n, densities, kind)
        assert torch.equal(expected[1, 0], expected[1, 1]) or densities[1] < 1  # density 1 keeps all


@needs_cpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_models_kernels_with_random_keep_are_the_reference(dtype, kind, generator):
    n = 3 * BLOCK + 17
    base, experts = models(kind, n, dtype, generator)
    keep = ops.RandomKeep(5, "w", DENSITIES[0])
    calls = {
        "task_arithmetic": lambda b: ops.task_arithmetic_models(
            base, experts, weights=[0.75, -0.5, 0.0], lam=0.9, random_keep=keep, backend=b),
        "ties": lambda b: ops.ties_merge_models(
            base, experts, thresholds=[0.0, 0.0, 0.0], weights=[1.0, 0.5, 2.0], sign="mass", disjoint="sum",
            zero_sign="positive", random_keep=keep, out_dtype=torch.float32, backend=b),
        "ties_count_mean": lambda b: ops.ties_merge_models(
            base, experts, thresholds=[0.0, 0.0, 0.0], weights=[1.0, 0.5, 2.0], sign="count", disjoint="mean",
            random_keep=keep, backend=b),
    }
    for name, call in calls.items():
        expected = outcome(lambda: call("torch"))
        assert_same(threads(1, lambda: outcome(lambda: call("cpu"))), expected)
        assert_same(threads(2, lambda: outcome(lambda: call("cpu"))), expected)
        if isinstance(expected, torch.Tensor):  # the reference is the masked task vectors' merge
            tv = ops.keep_task_vectors(base, experts, keep)
            dropped = ~keep_mask(5, "w", n, DENSITIES[0][2], stream=2)
            assert torch.equal(tv[2][dropped], torch.zeros(int(dropped.sum())))


def fused_and_masked(monkeypatch, plain=False, **kwargs):
    """merge_tensor's fused DARE path and its masked-task-vector path (``_dare_fused`` off); with
    ``plain``, that path's consensus in plain PyTorch (mergekit's rule step by step), not the kernel."""
    fused = outcome(lambda: merge_tensor(**kwargs))
    with monkeypatch.context() as m:
        m.setattr(generalized, "_dare_fused", lambda o: False)
        if plain:
            m.setattr(generalized, "_fused_consensus", lambda o: False)
        masked = outcome(lambda: merge_tensor(**kwargs))
    return fused, masked


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_dare_is_the_masked_path(method, dtype, generator, monkeypatch):
    """Every option: the fused kernels where they apply, bit-identical to merging the masked fp32
    task vectors; fp32 and the storage dtype out."""
    options = itertools.product(
        ((1.0, 1.0, 1.0), (0.75, -0.5, 1.25), (0.5, 0.0, 1.5)), (False, True), (False, True), DENSITIES,
        (torch.float32, dtype))
    for (weights, normalize, rescale, densities, out_dtype), n in zip(options, itertools.cycle(SIZES[:5])):
        base, experts = models("normal", n, dtype, generator)
        kwargs = dict(METHODS[method].kwargs(dict(weight=list(weights), density=list(densities), normalize=normalize,
                                                  rescale=rescale)), lam=0.8)
        fused, masked = fused_and_masked(monkeypatch, base=base.view(1, n), experts=[x.view(1, n) for x in experts],
                                         name="m.w", seed=3, out_dtype=out_dtype, **kwargs)
        assert isinstance(fused, torch.Tensor)
        assert_same(fused, masked)


@pytest.mark.parametrize("dtype", DTYPES)
def test_normalized_dare_ties_divides_by_the_raw_weights(dtype, generator, monkeypatch):
    """dare_ties with normalize and rescale (mergekit's most common config) on the TIES kernel,
    whose mean divides by the raw weights of the agreeing tasks (``divisors``) while it elects
    and sums with the rescaled ones: bit-identical to mergekit's rule written out in PyTorch."""
    for weights, densities, n in (((1.0, 1.0, 1.0), (0.5, 0.5, 0.5), 5000), ((0.75, 0.5, 1.25), (0.3, 0.9, 0.6), 3001),
                                  ((2.0, 0.25, 1.0), (0.1, 1.0, 0.5), 2 * BLOCK + 7)):
        base, experts = models("normal", n, dtype, generator)
        kwargs = METHODS["dare_ties"].kwargs(dict(weight=list(weights), density=list(densities), normalize=True,
                                                   **{"lambda": 0.8}))
        fused, plain = fused_and_masked(monkeypatch, plain=True, base=base, experts=experts, name="m.w", seed=3,
                                        out_dtype=torch.float32, **kwargs)
        assert isinstance(fused, torch.Tensor)
        assert_same(fused, plain)


@pytest.mark.parametrize("kind", KINDS)
def test_fused_dare_nasty_values(kind, generator, monkeypatch):
    base, experts = models(kind, 2 * BLOCK + 3, torch.bfloat16, generator)
    for method in ("dare_linear", "dare_ties"):
        kwargs = METHODS[method].kwargs(dict(weight=[1.0, 0.5, 0.25], density=[0.5, 1.0, 0.01]))
        fused, masked = fused_and_masked(monkeypatch, base=base, experts=experts, name="n.w", out_dtype=torch.bfloat16,
                                         **kwargs)
        assert_same(fused, masked)


@needs_cpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_recorded_keep_flags_are_the_draws(dtype, generator):
    """keep_l1_norms_models(record=True) records each task's keep flags (packed, whole blocks, 0
    past the end), the norms unchanged; the merge kernels reading them give the bits of drawing."""
    for n in SIZES:
        base, experts = models("normal", n, dtype, generator)
        keep = ops.RandomKeep(7, f"w.{n}", DENSITIES[1])
        norms, recorded = ops.keep_l1_norms_models(base, experts, keep, record=True, backend="cpu")
        assert torch.equal(norms, ops.keep_l1_norms_models(base, experts, keep, backend="cpu"))
        assert recorded[:3] == keep[:3] and recorded.bits.shape == (3, -(-n // BLOCK) * BLOCK // 8)
        for t, density in enumerate(DENSITIES[1]):
            flags = keep_mask(7, f"w.{n}", n, density, stream=t)
            padded = torch.nn.functional.pad(flags, (0, recorded.bits.shape[1] * 8 - n))
            assert torch.equal(ops.unpack_masks(recorded.bits[t:t + 1], padded.numel())[0], padded), (n, t)
        for call in (lambda k: ops.task_arithmetic_models(base, experts, weights=[0.5, 1.0, 2.0], random_keep=k),
                     lambda k: ops.ties_merge_models(base, experts, thresholds=[0.0] * 3, weights=[0.5, 1.0, 2.0],
                                                     random_keep=k, divisors=[1.0, 2.0, 3.0])):
            assert_same(call(recorded), call(keep))
    with pytest.raises(ValueError, match=r"random_keep.bits must be the contiguous CPU uint8 \[3, 128\]"):
        ops.task_arithmetic_models(base[:5], [x[:5] for x in experts], random_keep=recorded)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_nonfinite_in_a_dropped_element_is_named(method):
    n = 300
    base = torch.zeros(n)
    experts = [torch.full((n,), 0.5), torch.full((n,), -0.25), torch.full((n,), 1.0)]
    dropped = int((~keep_mask(0, "w", n, 0.1, stream=1)).nonzero()[0])
    kwargs = METHODS[method].kwargs(dict(weight=[1.0, 1.0, 1.0], density=0.1))
    for bad_value in (float("nan"), float("inf")):
        bad = experts[1].clone()
        bad[dropped] = bad_value
        with pytest.raises(ValueError, match=r"key 'w': expert 1 contains NaN or Inf"):
            merge_tensor(base, [experts[0], bad, experts[2]], **kwargs, name="w")
    with pytest.raises(ops.NonFiniteError, match=r"task_vectors\[2\]"):  # a task vector overflowing fp32
        ops.keep_l1_norms_models(torch.full((n,), -3e38), [base, base, torch.full((n,), 3e38)],
                                 ops.RandomKeep(0, "w", (0.5, 0.5, 0.5)))


def test_random_keep_is_checked():
    x = torch.zeros(4)
    with pytest.raises(ValueError, match="random_keep has 1 densities for 2 task vectors"):
        ops.task_arithmetic_models(x, [x, x], random_keep=ops.RandomKeep(0, "w", (0.5,)))
    with pytest.raises(ValueError, match=r"density must be in \[0, 1\]"):
        ops.ties_merge_models(x, [x], thresholds=[0.0], random_keep=ops.RandomKeep(0, "w", (1.5,)))
    with pytest.raises(ValueError, match="random_keep takes thresholds, not keep"):
        ops.ties_merge_models(x, [x], keep=0.5, random_keep=ops.RandomKeep(0, "w", (0.5,)))


needs_triton = pytest.mark.skipif(kernels.load("triton")[0] is None, reason="Triton is not available")
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_random_keep_is_the_reference(dtype, generator):
    """Triton's draws are the reference's: one-hot task arithmetic of ones from zeros is the keep
    mask itself; the models kernels with random_keep equal the reference bit for bit (nasty
    values, partial blocks); NaN in a dropped entry is named."""
    n = 2 * BLOCK + 37
    zeros, ones = (torch.full((n,), v, dtype=dtype, device=TRITON_DEVICE) for v in (0.0, 1.0))
    keep = ops.RandomKeep(7, "draws", (0.5, 0.3))
    for t in range(2):
        onehot = [float(s == t) for s in range(2)]
        got = ops.task_arithmetic_models(zeros, [ones, ones], weights=onehot, random_keep=keep, backend="triton")
        assert torch.equal(got.cpu() == 1, keep_mask(7, "draws", n, keep.densities[t], stream=t)), t
    calls = {
        "task_arithmetic": lambda b, e, k, be: ops.task_arithmetic_models(
            b, e, weights=[0.75, -0.5, 0.0], lam=0.9, random_keep=k, backend=be),
        "ties": lambda b, e, k, be: ops.ties_merge_models(
            b, e, thresholds=[0.0, 0.1, 0.0], weights=[1.0, 0.5, 2.0], sign="count", disjoint="mean",
            random_keep=k, out_dtype=torch.float32, backend=be),
    }
    for kind, size in zip(("mixed", "ties", "huge"), (n, BLOCK - 1, 15)):
        base, experts = models(kind, size, dtype, generator)
        keep = ops.RandomKeep(5, f"w.{kind}", DENSITIES[size % 2])
        for name, call in calls.items():
            got = outcome(lambda: call(base.to(TRITON_DEVICE), [x.to(TRITON_DEVICE) for x in experts], keep, "triton"))
            expected = outcome(lambda: call(base, experts, keep, "torch"))
            assert_same(got.cpu() if isinstance(got, torch.Tensor) else got, expected), (kind, size, name)
    bad = [x.clone().to(TRITON_DEVICE) for x in experts]
    bad[1][int((~keep_mask(5, "w.huge", 15, keep.densities[1], stream=1)).nonzero()[0])] = float("nan")
    for call in calls.values():
        with pytest.raises(ops.NonFiniteError, match=r"experts\[1\]"):
            call(base.to(TRITON_DEVICE), bad, keep, "triton")


@needs_triton
def test_triton_keep_l1_norms_are_the_reference(monkeypatch, generator):
    """Triton's norms (block sums on the device) equal the reference bit for bit: bf16 models with
    nasty values, a partial block, and (two blocks per program here) a partial group of blocks;
    a task vector overflowing fp32 is named."""
    module, _ = kernels.load("triton")
    monkeypatch.setattr(module, "_SUM_GROUP", 2)
    base, experts = models("mixed", 2 * BLOCK + 37, torch.bfloat16, generator)
    keep = ops.RandomKeep(3, "n", DENSITIES[1])
    got = ops.keep_l1_norms_models(base.to(TRITON_DEVICE), [x.to(TRITON_DEVICE) for x in experts], keep,
                                   backend="triton")
    assert torch.equal(got, ops.keep_l1_norms_models(base, experts, keep, backend="torch"))
    far = torch.full((5,), 3e38, device=TRITON_DEVICE)
    with pytest.raises(ops.NonFiniteError, match=r"task_vectors\[0\]"):
        ops.keep_l1_norms_models(-far, [far], ops.RandomKeep(0, "w", (0.5,)), backend="triton")
