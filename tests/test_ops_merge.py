"""Fused TIES, task arithmetic, TALL masks, consensus and mask application against the references."""
import numpy as np
import pytest
import torch

from nlmerge import kernels, ops
from nlmerge.merge._common import task_tensors
from nlmerge.ops._checks import NonFiniteResultError
from conftest import DTYPES, assert_matches, device_for, fast_backends, nasty

TASK_COUNTS = (1, 2, 3, 5, 8)
MERGE_KINDS = ("normal", "ties", "zeros", "equal", "denormal", "huge", "mixed")


def sizes_for(backend):
    return (1, 7, 4097) if backend == "triton" else (1, 7, 4097, 1_000_003)


def task_stack(kind, num_tasks, size, dtype, generator):
    return torch.stack([nasty(kind, (size,), dtype, generator) for _ in range(num_tasks)])


def thresholds_for(tv, keep=0.3):
    return [float(ops.magnitude_threshold(tau, keep, backend="torch")) for tau in tv]


def assert_same_outcome(expected_call, actual_call, where=None):
    """Both calls return matching tensors, or both raise NonFiniteResultError (a result that does
    not fit its dtype) with the same dtype and hint: huge inputs overflow 16-bit sums."""
    try:
        expected = expected_call()
    except NonFiniteResultError as err:
        with pytest.raises(NonFiniteResultError) as got:
            actual_call()
        assert (got.value.dtype, got.value.fits) == (err.dtype, err.fits), where
        return
    assert_matches(actual_call().cpu(), expected)


@pytest.mark.parametrize("backend", fast_backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_tasks", TASK_COUNTS)
def test_ties_pass_equals_reference(backend, dtype, num_tasks, generator):
    device = device_for(backend)
    for size in sizes_for(backend):
        for kind in MERGE_KINDS if size < 10**6 else ("mixed",):
            tv = task_stack(kind, num_tasks, size, dtype, generator)
            thr = thresholds_for(tv)
            weights = (torch.rand(num_tasks, generator=generator) + 0.25).tolist()
            divisors = (torch.rand(num_tasks, generator=generator) + 0.25).tolist()  # "mean" divides by these
            base = nasty("normal", (size,), dtype, generator)
            cases = [("mass", "mean", 0), ("count", "sum", 1), ("mass", "max", -1), ("count", "mean", 0)]
            if size < 10**6:
                cases += [(s, d, f) for s in ("mass", "count") for d in ("mean", "sum", "max") for f in (-1, 1)]
            for sign, disjoint, fill in cases:
                # unchecked: an overflowing result ("huge" 16-bit sums) is compared too, by its flag
                kwargs = dict(fill_sign=fill, sign=sign, disjoint=disjoint, weights=weights, base=base, lam=0.7,
                              check_result=False,
                              divisors=divisors if disjoint == "mean" and (sign == "count" or fill == 1) else None)
                expected = ops.ties_merge_pass(tv, thr, backend="torch", **kwargs)
                kwargs["base"] = base.to(device)
                actual = ops.ties_merge_pass(tv.to(device), thr, backend=backend, **kwargs)
                where = (size, kind, sign, disjoint, fill)
                assert actual[1:] == expected[1:], where  # sign_sum, ambiguous, overflow, ambiguous_blocks
                assert_matches(actual.merged.cpu(), expected.merged)


@pytest.mark.parametrize("backend", fast_backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ties_merge_majority_sign_and_no_base(backend, dtype, generator):
    device = device_for(backend)
    # exact cancellations (+a, -a) make zero elected signs with non-zero entries: the majority decides
    a = nasty("ties", (997,), dtype, generator)
    tv = torch.stack([a, -a, nasty("ties", (997,), dtype, generator).clamp_min(0)])
    for zero_sign in ("majority", "positive"):
        expected = ops.ties_merge(tv, [0.0, 0.0, 0.0], zero_sign=zero_sign, backend="torch")
        actual = ops.ties_merge(tv.to(device), [0.0, 0.0, 0.0], zero_sign=zero_sign, backend=backend)
        assert_matches(actual.cpu(), expected)
    first = ops.ties_merge_pass(tv, [0.0] * 3, fill_sign=0, backend="torch")
    assert first.ambiguous > 0 and first.sign_sum > 0
    # the majority rerun writes into the first pass's buffer
    out = torch.full((997,), float("nan"), dtype=dtype, device=device)
    again = ops.ties_merge_pass(tv.to(device), [0.0] * 3, fill_sign=1, out=out, backend=backend)
    assert again.merged.data_ptr() == out.data_ptr()
    assert_matches(out.cpu(), ops.ties_merge(tv, [0.0] * 3, backend="torch"))
    with pytest.raises(ValueError, match="out must be a contiguous"):
        ops.ties_merge_pass(tv.to(device), [0.0] * 3, fill_sign=1, out=out[:-1], backend=backend)


def test_ties_reference_is_the_recipe(generator):
    """The reference equals the original TIES steps written out with stacked tensors."""
    tv = torch.randn(4, 2001, generator=generator)
    thr = torch.tensor(thresholds_for(tv, 0.2))
    trimmed = tv * (tv.abs() >= thr[:, None])
    s = torch.sign(trimmed.sum(0))
    s[s == 0] = torch.sign(s.sum())
    agree = torch.where(s > 0, trimmed > 0, trimmed < 0)
    mean = (trimmed * agree).sum(0) / agree.sum(0).clamp(min=1)
    torch.testing.assert_close(ops.ties_merge(tv, thr, backend="torch"), mean, rtol=1e-6, atol=1e-7)
    maxed = (trimmed * agree).abs().amax(0) * s
    assert torch.equal(ops.ties_merge(tv, thr, disjoint="max", backend="torch"), maxed)


@pytest.mark.parametrize("backend", fast_backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_tasks", TASK_COUNTS)
def test_task_arithmetic_equals_reference(backend, dtype, num_tasks, generator):
    device = device_for(backend)
    for size in sizes_for(backend):
        for kind in ("normal", "mixed", "denormal", "zeros"):
            tv = task_stack(kind, num_tasks, size, dtype, generator)
            weights = (torch.randn(num_tasks, generator=generator)).tolist()  # negative allowed
            base = nasty("normal", (size,), dtype, generator)
            for b in (None, base):
                assert_same_outcome(
                    lambda: ops.task_arithmetic(tv, weights=weights, base=b, lam=0.3, backend="torch"),
                    lambda: ops.task_arithmetic(
                        tv.to(device), weights=weights, base=None if b is None else b.to(device), lam=0.3, backend=backend
                    ),
                    (size, kind),
                )


@pytest.mark.parametrize("backend", fast_backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_tasks", TASK_COUNTS)
def test_tall_consensus_apply_equal_reference(backend, dtype, num_tasks, generator):
    device = device_for(backend)
    for size in sizes_for(backend):
        for kind in ("normal", "ties", "mixed", "equal", "zeros"):
            # scaled so that tau_MTL (a sum over tasks) does not overflow fp16
            tv = (task_stack(kind, num_tasks, size, dtype, generator).float() / num_tasks).to(dtype)
            mtl = ops.task_arithmetic(tv, backend="torch")
            lam = (torch.rand(num_tasks, generator=generator) * 2).tolist()
            base = nasty("normal", (size,), dtype, generator)
            expected = ops.tall_masks(tv, mtl, lam, backend="torch")
            actual = ops.tall_masks(tv.to(device), mtl.to(device), lam, backend=backend)
            assert torch.equal(actual.cpu(), expected), (size, kind)
            for k in sorted({1, min(2, num_tasks), num_tasks}):
                assert_same_outcome(
                    lambda: ops.consensus_merge(tv, mtl, lam, k=k, base=base, alpha=0.9, backend="torch"),
                    lambda: ops.consensus_merge(
                        tv.to(device), mtl.to(device), lam, k=k, base=base.to(device), alpha=0.9, backend=backend
                    ),
                    (size, kind, k),
                )
            for t in (0, num_tasks - 1):
                for b in (None, base):
                    exp = ops.apply_mask(expected[t], mtl, base=b, backend="torch")
                    act = ops.apply_mask(actual[t], mtl.to(device), base=None if b is None else b.to(device), backend=backend)
                    if b is None:
                        assert torch.equal(act.cpu(), exp)
                    else:
                        assert_matches(act.cpu(), exp)


def test_tall_reference_definition(generator):
    tv = torch.randn(3, 37, generator=generator)
    mtl = tv.sum(0)
    lam = [0.2, 0.5, 1.0]
    masks = ops.unpack_masks(ops.tall_masks(tv, mtl, lam, backend="torch"), 37)
    for t in range(3):
        assert torch.equal(masks[t], tv[t].abs() > lam[t] * (mtl - tv[t]).abs())
    rebuilt = ops.apply_mask(ops.pack_masks(masks)[1], mtl, backend="torch")
    assert torch.equal(rebuilt, masks[1] * mtl)
    count = masks.sum(0)
    assert torch.equal(ops.consensus_merge(tv, mtl, lam, k=2, backend="torch"), (count >= 2) * mtl)


@pytest.mark.parametrize("backend", fast_backends())
def test_kernels_write_every_output_element(backend, generator):
    """Outputs are poisoned before the kernel writes them: nothing may be left over."""
    module, _ = kernels.load(backend)
    device = device_for(backend)
    tv = torch.randn(3, 1001, generator=generator).to(device)
    mtl = tv.sum(0)
    lam = torch.full((3,), 0.5, device=device)
    ones = torch.ones(3, device=device)
    out = torch.full((1001,), float("nan"), device=device)
    module.ties_merge(tv, torch.zeros(3, device=device), ones, out, None, 1.0, "mass", "mean", 0)
    assert torch.isfinite(out).all()
    out.fill_(float("nan"))
    module.task_arithmetic(tv, ones, out, None, 1.0)
    assert torch.isfinite(out).all()
    packed = torch.full((3, 126), 0xFF, dtype=torch.uint8, device=device)
    module.tall_masks(tv, mtl, lam, packed)
    assert torch.equal(packed.cpu(), ops.tall_masks(tv.cpu(), mtl.cpu(), 0.5, backend="torch"))
    out.fill_(float("nan"))
    module.consensus(tv, mtl, lam, 2, out, None, 1.0)
    assert torch.isfinite(out).all()
    out.fill_(float("nan"))
    module.apply_mask(packed[0], mtl, out, None)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("backend", fast_backends())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_kernels_count_results_that_overflow(backend, dtype, generator):
    """The kernels' non-finite count includes every stored result that is Inf in the output dtype
    (finite inputs here), exactly: CONTRACT.md. Elements in several blocks, one in a partial one."""
    module, _ = kernels.load(backend)
    device = device_for(backend)
    n = 2 * 1024 + 37
    big = 4.0e4 if dtype == torch.float16 else 1.7e38  # two of them overflow the output dtype
    where = torch.randperm(n, generator=generator)[:5]
    where[0] = n - 1
    tv = torch.rand(2, n, generator=generator)
    tv[:, where] = big
    tv = tv.to(device)
    base = torch.zeros(n, dtype=dtype, device=device)
    ones = torch.ones(2, device=device)
    out = torch.empty(n, dtype=dtype, device=device)
    assert module.task_arithmetic(tv, ones, out, base, 1.0) == 5
    assert module.ties_merge(tv, torch.zeros(2, device=device), ones, out, base, 1.0, "mass", "sum", 0)[2] == 5
    mtl = tv.sum(0)
    lam = torch.full((2,), 0.5, device=device)
    assert module.consensus(tv, mtl, lam, 1, out, base, 1.0) == 5
    packed = torch.full(((n + 7) // 8,), 0xFF, dtype=torch.uint8, device=device)
    assert module.apply_mask(packed, mtl, out, base) == 5
    assert module.apply_mask(packed, mtl, torch.empty(n, device=device), None) == 0  # fp32 holds it
    assert module.task_arithmetic(tv, ones * 0.25, out, base, 1.0) == 0


@pytest.mark.parametrize("backend", ["torch", *fast_backends()])
def test_non_contiguous_and_sequence_inputs(backend, generator):
    device = device_for(backend)
    wide = torch.randn(4, 30, 20, generator=generator)
    tv = wide.transpose(1, 2).to(device)  # [4, 20, 30], not contiguous
    as_list = [tv[t] for t in range(4)]
    thr = thresholds_for(wide.transpose(1, 2))
    ref = ops.ties_merge(tv.contiguous().cpu(), thr, backend="torch")
    assert_matches(ops.ties_merge(tv, thr, backend=backend).cpu(), ref)
    assert_matches(ops.ties_merge(as_list, thr, backend=backend).cpu(), ref)
    assert ops.task_arithmetic(as_list, backend=backend).shape == (20, 30)


@pytest.mark.parametrize("backend", ["torch", *fast_backends()])
def test_merge_ops_bad_input(backend, generator):
    device = device_for(backend)
    tv = torch.randn(3, 50, generator=generator).to(device)
    before = tv.clone()
    base = torch.randn(50, generator=generator).to(device)
    thr = [0.1, 0.1, 0.1]
    for bad in (float("nan"), float("inf")):
        poisoned = tv.clone()
        poisoned[2, 7] = bad
        with pytest.raises(ops.NonFiniteError, match=r"task_vectors\[2\] contains NaN or Inf"):
            ops.ties_merge(poisoned, thr, backend=backend)
        with pytest.raises(ops.NonFiniteError, match=r"task_vectors\[2\]"):
            ops.task_arithmetic(poisoned, backend=backend)
        with pytest.raises(ops.NonFiniteError, match=r"task_vectors\[2\]"):
            ops.tall_masks(poisoned, tv.sum(0), 0.4, backend=backend)
        bad_base = base.clone()
        bad_base[0] = bad
        with pytest.raises(ops.NonFiniteError, match=r"^base contains"):
            ops.task_arithmetic(tv, base=bad_base, backend=backend)
        with pytest.raises(ops.NonFiniteError, match=r"^tau_mtl contains"):
            ops.consensus_merge(tv, bad_base, 0.4, backend=backend)
        with pytest.raises(ops.NonFiniteError, match=r"^tau_mtl contains"):
            ops.apply_mask(torch.zeros(7, dtype=torch.uint8, device=device), bad_base, backend=backend)
    with pytest.raises(ValueError, match=r"task_vectors\[1\] has shape \(49,\) but task_vectors\[0\] has shape \(50,\)"):
        ops.task_arithmetic([tv[0], tv[1, :49]], backend=backend)
    with pytest.raises(ValueError, match=r"task_vectors\[1\] has dtype torch.float16 but task_vectors\[0\] has dtype torch.float32"):
        ops.task_arithmetic([tv[0], tv[1].half()], backend=backend)
    with pytest.raises(ValueError, match=r"base has shape \(49,\) but each of task_vectors has shape \(50,\)"):
        ops.ties_merge(tv, thr, base=base[:49], backend=backend)
    assert ops.ties_merge(tv, thr, base=base.bfloat16(), backend=backend).dtype == torch.bfloat16  # the base's dtype
    with pytest.raises(ValueError, match="thresholds has 2 entries for 3 task vectors"):
        ops.ties_merge(tv, thr[:2], backend=backend)
    with pytest.raises(ValueError, match=r"weights\[1\] must be positive \(> 0\), got -1.0"):
        ops.ties_merge(tv, thr, weights=[1.0, -1.0, 1.0], backend=backend)
    with pytest.raises(ValueError, match=r"divisors\[2\] must be positive \(> 0\), got 0.0"):
        ops.ties_merge(tv, thr, divisors=[1.0, 1.0, 0.0], backend=backend)
    assert torch.equal(ops.ties_merge(tv, thr, weights=np.array([1.0, 2.0, 3.0]), divisors=np.array([1.0, 1.0, 2.0]),
                                      backend=backend),
                       ops.ties_merge(tv, thr, weights=[1.0, 2.0, 3.0], divisors=[1.0, 1.0, 2.0], backend=backend))
    with pytest.raises(ValueError, match="divisors has 2 entries for 3 task vectors"):
        ops.ties_merge_models(base, list(tv + base), thresholds=thr, divisors=[1.0, 1.0], backend=backend)
    with pytest.raises(ValueError, match=r"divisors are what disjoint='mean' divides by; disjoint is 'sum'"):
        ops.ties_merge_pass(tv, thr, fill_sign=1, disjoint="sum", divisors=[1.0] * 3, backend=backend)
    with pytest.raises(ValueError, match=r"lam\[1\] must be finite"):
        ops.tall_masks(tv, tv.sum(0), [0.1, float("nan"), 0.2], backend=backend)
    with pytest.raises(ValueError, match="sign must be one of"):
        ops.ties_merge(tv, thr, sign="vote", backend=backend)
    with pytest.raises(ValueError, match="disjoint must be one of"):
        ops.ties_merge(tv, thr, disjoint="median", backend=backend)
    for fill in (True, 1.0, torch.tensor(1), 2, "majority"):
        with pytest.raises(ValueError, match=r"fill_sign must be -1, 0, 1 or 'sample', got "):
            ops.ties_merge_pass(tv, thr, fill_sign=fill, backend=backend)
    for k in (-1, 0, 4, 2.0, True):  # 0 would keep everything, more than T nothing
        with pytest.raises(ValueError, match=rf"k must be an integer in \[1, 3\] \(the number of tasks\), got {k!r}"):
            ops.consensus_merge(tv, tv.sum(0), 0.4, k=k, backend=backend)
    with pytest.raises(ValueError, match=r"lam\[2\] must be non-negative \(>= 0\), got -0.1"):
        ops.tall_masks(tv, tv.sum(0), [0.1, 0.2, -0.1], backend=backend)
    with pytest.raises(ValueError, match=r"lam\[0\] must be non-negative"):
        ops.consensus_merge(tv, tv.sum(0), -0.4, backend=backend)
    with pytest.raises(ValueError, match=r"thresholds\[1\] must be non-negative \(>= 0\), got -0.5"):
        ops.ties_merge(tv, [0.1, -0.5, 0.1], backend=backend)
    with pytest.raises(ValueError, match=r"alpha must be finite, got inf"):
        ops.consensus_merge(tv, tv.sum(0), 0.4, alpha=float("inf"), backend=backend)
    with pytest.raises(ValueError, match=r"lam must be finite, got nan"):
        ops.task_arithmetic(tv, lam=float("nan"), backend=backend)
    with pytest.raises(ValueError, match=r"weights\[0\] must be finite, got -inf"):
        ops.task_arithmetic(tv, weights=[-float("inf"), 1.0, 1.0], backend=backend)
    for numel in (-1, 2.5, True):
        with pytest.raises(ValueError, match=rf"numel must be an integer >= 0, got {numel!r}"):
            ops.packed_size(numel)
    with pytest.raises(ValueError, match=r"packed_row must be uint8 \[7\]"):
        ops.apply_mask(torch.zeros(6, dtype=torch.uint8, device=device), base, backend=backend)
    assert torch.equal(tv, before)


@pytest.mark.parametrize("backend", ["torch"] + fast_backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("majority", [-1, 1])
def test_ties_merge_zero_signs_follow_the_recipe(backend, dtype, majority, generator):
    """Exact cancellations (+a, -a) leave zero elected signs; the majority sign over the tensor fills
    them, for either majority and every disjoint mode (the rerun is skipped where fill 0 already
    gives the majority's result), against the TIES steps written out."""
    device = device_for(backend)
    a = nasty("ties", (997,), dtype, generator)
    tv = torch.stack([a, -a, majority * nasty("ties", (997,), dtype, generator).abs()])
    x = tv.float()
    s = torch.sign(x.sum(0))
    assert int(torch.sign(s.sum())) == majority and bool(((s == 0) & (x != 0).any(0)).any())
    s[s == 0] = majority
    agree = torch.where(s > 0, x > 0, x < 0)
    recipes = {"sum": (x * agree).sum(0), "mean": (x * agree).sum(0) / agree.sum(0).clamp(min=1),
               "max": (x * agree).abs().amax(0) * s}
    for disjoint, expected in recipes.items():
        actual = ops.ties_merge(tv.to(device), [0.0] * 3, disjoint=disjoint, backend=backend)
        assert_matches(actual.cpu(), expected.to(dtype))


def old_task_arithmetic(base, experts, backend, **kwargs):
    """Task arithmetic the way the merges did it before ``task_arithmetic_models``: fp32 task
    vectors (``task_tensors``), then the fused op on them."""
    taus = task_tensors("k", {"k": base}, [{"k": x} for x in experts])
    return ops.task_arithmetic(taus, base=base, backend=backend, **kwargs)


def model_set(kind, num_tasks, size, dtype, generator):
    """A base and experts near it (task vectors small next to the weights, as in fine-tuning)."""
    base = nasty(kind, (size,), dtype, generator)
    experts = [(base.float() + 0.1 * torch.randn(size, generator=generator)).to(dtype) for _ in range(num_tasks)]
    return base, experts


@pytest.mark.parametrize("backend", ["torch", *fast_backends()])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_tasks", (1, 2, 3, 4, 5))
def test_task_arithmetic_models_is_bit_identical_to_task_vectors(backend, dtype, num_tasks, generator):
    """Bit for bit the old path (fp32 task vectors, then task_arithmetic), negative weights, every
    output dtype, sizes with partial strips and blocks; the kernel writes every element of a
    poisoned output and counts nothing."""
    device = device_for(backend)
    module, _ = kernels.load(backend) if backend != "torch" else (None, None)
    for size in (7, 1031) if backend == "triton" and not torch.cuda.is_available() else (1, 7, 1031, 4097):
        for kind in ("normal", "mixed", "denormal"):
            base, experts = model_set(kind, num_tasks, size, dtype, generator)
            base, experts = base.to(device), [x.to(device) for x in experts]
            weights = (torch.randn(num_tasks, generator=generator) * 2).tolist()
            for out_dtype in (None, *DTYPES):
                kw = dict(weights=weights, lam=0.7, out_dtype=out_dtype)
                try:
                    expected = old_task_arithmetic(base, experts, backend, **kw)
                except NonFiniteResultError as err:  # "mixed" holds 1e30: too large for 16 bits
                    with pytest.raises(NonFiniteResultError) as got:
                        ops.task_arithmetic_models(base, experts, backend=backend, **kw)
                    assert (got.value.dtype, got.value.fits) == (err.dtype, err.fits)
                    continue
                got = ops.task_arithmetic_models(base, experts, backend=backend, **kw)
                assert got.dtype == expected.dtype and torch.equal(got.cpu(), expected.cpu()), (size, kind, out_dtype)
            if backend == "cpu" and kind != "mixed":
                out = torch.full((size,), float("nan"), dtype=dtype)
                assert module.task_arithmetic_models(base, experts, torch.tensor(weights), out, 0.7) == 0
                assert torch.equal(out, old_task_arithmetic(base, experts, backend, weights=weights, lam=0.7))


def test_task_arithmetic_models_mixed_dtypes_and_shapes(generator):
    """Experts in another dtype than the base: converted to fp32 first (the old path's values, the
    base's dtype out); a shape is kept; bad layouts are refused naming the expert."""
    base = torch.randn(6, 35, generator=generator).to(torch.bfloat16)
    experts = [torch.randn(6, 35, generator=generator), torch.randn(6, 35, generator=generator).half()]
    for backend in ("torch", *(["cpu"] if kernels.load("cpu")[0] is not None else [])):
        got = ops.task_arithmetic_models(base, experts, weights=[1.0, -0.5], backend=backend)
        expected = old_task_arithmetic(base, experts, backend, weights=[1.0, -0.5])
        assert got.shape == (6, 35) and got.dtype == torch.bfloat16 and torch.equal(got, expected)
    with pytest.raises(ValueError, match=r"experts\[1\] has shape \(6, 34\)"):
        ops.task_arithmetic_models(base, [experts[0], experts[1][:, :34]])
    with pytest.raises(ValueError, match="non-empty sequence"):
        ops.task_arithmetic_models(base, [])
    with pytest.raises(ValueError, match=r"weights has 1 entries for 2"):
        ops.task_arithmetic_models(base, experts, weights=[1.0])


@pytest.mark.parametrize("backend", ["torch", *fast_backends()])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_task_arithmetic_models_nonfinite_inputs_and_overflow(backend, dtype, generator):
    """NaN/Inf in a model or a task vector that overflows fp32: NonFiniteError naming it, where
    the old path raised NonFiniteError too; a result that overflows its dtype:
    NonFiniteResultError with the old path's dtype and hint. The kernel's count equals the old
    kernel's (inputs and results, exactly) over several blocks."""
    device = device_for(backend)
    n = 2 * 1024 + 37
    base, experts = model_set("normal", 3, n, dtype, generator)
    finfo = torch.finfo(dtype)
    cases = []
    for bad in (float("nan"), float("inf")):
        poisoned = [x.clone() for x in experts]
        poisoned[2][n - 1] = bad
        cases.append((base, poisoned, r"experts\[2\] contains"))
        bad_base = base.clone()
        bad_base[5] = bad
        cases.append((bad_base, experts, r"^base contains"))
    far = [x.clone() for x in experts]  # finite models whose difference overflows fp32
    far[1][3], base_far = finfo.max, base.clone()
    base_far[3] = -finfo.max
    if dtype != torch.float16:  # an fp16 difference always fits fp32
        cases.append((base_far, far, r"task_vectors\[1\] contains"))
    for b, ex, message in cases:
        b, ex = b.to(device), [x.to(device) for x in ex]
        with pytest.raises(ops.NonFiniteError) as old:
            old_task_arithmetic(b, ex, backend)
        assert not isinstance(old.value, NonFiniteResultError)
        with pytest.raises(ops.NonFiniteError, match=message) as new:
            ops.task_arithmetic_models(b, ex, backend=backend)
        assert not isinstance(new.value, NonFiniteResultError)
    # results that overflow the output dtype (fp32 holds them), in several blocks and a partial one
    where = torch.randperm(n, generator=generator)[:5]
    where[0] = n - 1
    top, b_top = [x.clone() for x in experts], base.clone()
    for x in (b_top, *top):
        x[where] = finfo.max / 2
    top[0][where] = finfo.max  # task vector max / 2 there, 0 in the other experts
    top, b_top = [x.to(device) for x in top], b_top.to(device)
    for lam, out_dtype in ((2.0, None), (1e38, torch.float32)):  # the second overflows fp32 too
        with pytest.raises(NonFiniteResultError) as old:
            old_task_arithmetic(b_top, top, backend, lam=lam, out_dtype=out_dtype)
        with pytest.raises(NonFiniteResultError) as new:
            ops.task_arithmetic_models(b_top, top, lam=lam, out_dtype=out_dtype, backend=backend)
        assert (new.value.dtype, new.value.fits) == (old.value.dtype, old.value.fits)
    if backend == "cpu":
        module, _ = kernels.load("cpu")
        ones = torch.ones(3)
        for b, ex in [(b_top, top), *[(b, ex) for b, ex, _ in cases]]:
            taus = task_tensors("k", {"k": b}, [{"k": x} for x in ex])
            out_old, out_new = torch.empty(n, dtype=dtype), torch.empty(n, dtype=dtype)
            count = module.task_arithmetic(taus, ones, out_old, b, 2.0)
            assert count > 0 and module.task_arithmetic_models(b, ex, ones, out_new, 2.0) == count


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_task_arithmetic_models_thread_count_free(dtype, generator):
    """1 and 2 OpenMP threads write the same bits (blocks are split between threads)."""
    if kernels.load("cpu")[0] is None:
        pytest.skip("cpu backend unavailable")
    base, experts = model_set("mixed", 3, 1_000_003, dtype, generator)
    weights = [0.5, -1.25, 2.0]
    threads = torch.get_num_threads()
    try:
        results = []
        for count in (1, 2):
            torch.set_num_threads(count)
            results.append(ops.task_arithmetic_models(base, experts, weights=weights, lam=0.3, backend="cpu"))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0], results[1])
    assert torch.equal(results[0], old_task_arithmetic(base, experts, "cpu", weights=weights, lam=0.3))
