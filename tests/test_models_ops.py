"""The ``*_models`` ops (task vectors formed from the base and the experts inside the kernel) against
their definition: the stacked-task-vector reference on ``model_task_vectors(base, experts)``.

The C++ and Triton kernels do the same fp32 operations in the same order as the reference, so every
result, threshold, mask, count and block list is compared with ``torch.equal`` (Triton: tiny shapes
in the interpreter).
"""
import pytest
import torch

from nlmerge import kernels, ops
from nlmerge.ops import selection
from nlmerge.ops._checks import NonFiniteResultError, model_task_vectors
from nlmerge.ops.ties import BLOCK
from conftest import DTYPES, device_for, fast_backends, nasty

KINDS = ("normal", "ties", "zeros", "equal", "denormal", "huge", "mixed")
HAS_CPU = kernels.load("cpu")[0] is not None
needs_cpu = pytest.mark.skipif(not HAS_CPU, reason="cpu backend unavailable")


def sizes_for(backend):
    return (7, 1031) if backend == "triton" and not torch.cuda.is_available() else (1, 7, 1031, 2 * BLOCK + 37)


def models(kind, num_tasks, size, dtype, generator):
    """A base and T experts: half near the base (fine-tuning), half of the nasty kind itself (their
    task vectors then hold the kind's values: ties, zeros, huge, ...)."""
    base = nasty(kind, (size,), dtype, generator)
    experts = []
    for t in range(num_tasks):
        if t % 2:
            experts.append(nasty(kind, (size,), dtype, generator))
        else:
            experts.append((base.float() + 0.1 * torch.randn(size, generator=generator)).to(dtype))
    return base, experts


def on(device, base, experts):
    return base.to(device), [x.to(device) for x in experts]


def thresholds_of(base, experts, keep=0.3):
    return torch.stack([ops.magnitude_threshold(tau, keep, backend="torch") for tau in model_task_vectors(base, experts)])


@pytest.mark.parametrize("backend", fast_backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_tasks", (1, 2, 4))
def test_ties_pass_models_equals_reference(backend, dtype, num_tasks, generator):
    """Every sign/disjoint/fill mode, with and without the base, every output dtype, unit and other
    weights: merged, sign_sum, ambiguous, overflow and ambiguous_blocks equal the reference's."""
    device = device_for(backend)
    for size in sizes_for(backend):
        for kind in KINDS:
            base, experts = models(kind, num_tasks, size, dtype, generator)
            thr = thresholds_of(base, experts)
            tv = model_task_vectors(base, experts)
            weights = (torch.rand(num_tasks, generator=generator) + 0.25).tolist()
            cases = [(s, d, f) for s in ("mass", "count") for d in ("mean", "sum", "max") for f in (-1, 0, 1)]
            for i, (sign, disjoint, fill) in enumerate(cases):
                include_base = i % 2 == 0
                out_dtype = (None, *DTYPES)[i % 4]
                unit = i % 3 == 0  # unit weights: the C++ kernel leaves the multiplies out
                kw = dict(fill_sign=fill, sign=sign, disjoint=disjoint, weights=None if unit else weights, lam=0.7,
                          check_result=False)
                expected = ops.ties_merge_pass(tv, thr, base=base if include_base else None,
                                               out_dtype=out_dtype or dtype, backend="torch", **kw)
                b, ex = on(device, base, experts)
                got = ops.ties_merge_pass_models(b, ex, thr, include_base=include_base, out_dtype=out_dtype,
                                                 backend=backend, **kw)
                where = (size, kind, sign, disjoint, fill, include_base, out_dtype)
                assert got.merged.dtype == expected.merged.dtype, where
                assert torch.equal(got.merged.cpu(), expected.merged), where
                assert got[1:5] == expected[1:5], where


@pytest.mark.parametrize("backend", ["torch", *fast_backends()])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_thresholds_and_histograms_from_models(backend, dtype, generator):
    """magnitude_threshold_models / kth_smallest_magnitude_models (one pair and several taken
    together) equal the selection on the fp32 task vectors; the selector's models passes count
    exactly what count/count_low count on the task vector (a size above the one-thread cut)."""
    device = device_for(backend)
    small = backend == "triton" and not torch.cuda.is_available()
    for kind in KINDS:
        size = 1031 if small else 3001
        base, experts = models(kind, 3, size, dtype, generator)
        tv = model_task_vectors(base, experts)
        b, ex = on(device, base, experts)
        for t in range(3):
            for keep in (0.3, 1e-4, 1.0):
                got = ops.magnitude_threshold_models(b, ex[t], keep, backend=backend)
                assert got.dtype == torch.float32
                assert torch.equal(got.cpu(), ops.magnitude_threshold(tv[t], keep, backend="torch")), (kind, t, keep)
            k = int(torch.randint(1, size + 1, (1,), generator=generator))
            got = ops.kth_smallest_magnitude_models(b, ex[t], k, backend=backend)
            assert torch.equal(got.cpu(), ops.kth_smallest_magnitude(tv[t], k, backend="torch")), (kind, t, k)
        halves = ([b[:500], b[500:]], [ex[1][:500], ex[1][500:]])
        got = ops.kth_smallest_magnitude_models(*halves, 777, backend=backend)
        assert torch.equal(got.cpu(), ops.kth_smallest_magnitude(tv[1], 777, backend="torch"))
    n = 1031 if small else 300_001
    base, experts = models("mixed", 1, n, dtype, generator)
    tau = model_task_vectors(base, experts)[0]
    b, ex = on(device, base, experts)
    new, old = ops.MagnitudeSelector(device, backend=backend), ops.MagnitudeSelector("cpu", backend="torch")
    new.count_models(b, ex[0])
    old.count(tau)
    k = n // 3
    new.locate(k).count_low_models(b, ex[0])
    old.locate(k).count_low(tau)
    assert torch.equal(new.high.cpu(), old.high) and torch.equal(new.low.cpu(), old.low)
    assert torch.equal(new.threshold().cpu(), old.threshold())


@needs_cpu
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_window_counts_of_several_tasks_in_one_pass(kind, dtype, generator):
    """count_window_models_tasks: each task's window counts (its own window: near the bottom, the
    middle, the top of the finite magnitudes) equal the task-by-task counts exactly; a NaN in one
    expert is named by that expert's label."""
    from nlmerge.ops.streaming_selection import count_window_models_tasks

    n = 3 * 4096 + 1031  # several of the kernel's runs and a partial one
    base, experts = models(kind, 3, n, dtype, generator)
    k = n // 2
    joint = [ops.MagnitudeSelector("cpu", backend="cpu", sample_stride=7) for _ in experts]
    alone = [ops.MagnitudeSelector("cpu", backend="cpu", sample_stride=7) for _ in experts]
    for t, x in enumerate(experts):
        for sel in (joint[t], alone[t]):
            sel.sample_models(base, x)
            sel.bracket(k)
    windows = {(sel._lo, sel.window_counts.numel()) for sel in joint}
    for sel, lo in zip(joint[1:], (0, 0x7F800000 - (1 << 16))):  # forced windows at both ends
        sel._lo = alone[joint.index(sel)]._lo = lo
        sel.window_counts = torch.zeros((1 << 16) + 1, dtype=torch.int64)
        alone[joint.index(sel)].window_counts = torch.zeros((1 << 16) + 1, dtype=torch.int64)
    count_window_models_tasks(joint, base, experts, ["a", "b", "c"])
    for sel, x in zip(alone, experts):
        sel.count_window_models(base, x)
    for a, b in zip(joint, alone):
        assert torch.equal(a.window_counts, b.window_counts)
        assert int(a.window_counts.sum()) <= n
    assert windows  # the sampled windows were used for task 0
    bad = [x.clone() for x in experts]
    bad[1][n - 3] = float("nan")
    with pytest.raises(ops.NonFiniteError, match="^second contains NaN or Inf"):
        count_window_models_tasks(joint, base, bad, ["first", "second", "third"])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_count_window_equals_torch(dtype, generator):
    """Triton's one-read window count (of an fp32 tensor, and of the models' task vector formed in
    registers) equals the torch form: windows around, below, above and over the data, and the
    non-finite count (what the C++ kernels are held to in test_ops_selection)."""
    module, reason = kernels.load("triton")
    if module is None:
        pytest.skip(f"triton unavailable: {reason}")
    device = device_for("triton")
    for n in (1, 2 * BLOCK + 37):
        base, experts = models("mixed", 1, n, dtype, generator)
        experts[0][n // 2] = float("inf")
        tau = model_task_vectors(base, experts)[0]
        bits = selection._fp32_bits(tau)
        pick = int(bits[int(torch.randint(0, n, (), generator=generator))])
        for lo, width in ((pick, 1), (pick - 500, 1000), (0, 1 << 16), (0x7F7F0000, 1 << 16), (0x3F000000, 3)):
            lo = min(max(lo, 0), 0x7F800000 - width)
            expected = torch.zeros(width + 1, dtype=torch.int64)
            nonfinite = selection.count_window(None, tau, expected, lo)
            assert nonfinite == int((~tau.isfinite()).sum()) > 0
            got = torch.full((width + 1,), 7, dtype=torch.int64, device=device)
            assert module.count_window_models(base.to(device), experts[0].to(device), got, lo) == nonfinite
            assert torch.equal(got.cpu() - 7, expected), (n, lo, width)  # accumulated
            got.zero_()
            assert module.count_window(tau.to(device), got, lo) == nonfinite
            assert torch.equal(got.cpu(), expected), (n, lo, width)


@pytest.mark.parametrize("backend", fast_backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_tall_and_consensus_models_equal_reference(backend, dtype, generator):
    device = device_for(backend)
    for size in sizes_for(backend):
        for kind in KINDS:
            base, experts = models(kind, 3, size, dtype, generator)
            tv = model_task_vectors(base, experts)
            mtl = ops.task_arithmetic(tv, backend="torch")
            lam = [0.0, 0.4, 1.5]
            b, ex = on(device, base, experts)
            got = ops.tall_masks_models(b, ex, mtl.to(device), lam, backend=backend)
            assert torch.equal(got.cpu(), ops.tall_masks(tv, mtl, lam, backend="torch")), (size, kind)
            for k, out_dtype in ((1, None), (2, torch.float32), (3, dtype)):
                try:
                    expected = ops.consensus_merge(tv, mtl, lam, k=k, base=base, alpha=0.5, out_dtype=out_dtype or dtype,
                                                   backend="torch")
                except NonFiniteResultError as err:  # huge values overflow 16 bits
                    with pytest.raises(NonFiniteResultError) as new:
                        ops.consensus_merge_models(b, ex, mtl.to(device), lam, k=k, alpha=0.5, out_dtype=out_dtype,
                                                   backend=backend)
                    assert (new.value.dtype, new.value.fits) == (err.dtype, err.fits)
                    continue
                got = ops.consensus_merge_models(b, ex, mtl.to(device), lam, k=k, alpha=0.5, out_dtype=out_dtype,
                                                 backend=backend)
                assert torch.equal(got.cpu(), expected), (size, kind, k)


def nonfinite_cases(dtype, n, generator):
    """(base, experts, message) with a NaN/Inf in the base, in an expert, or finite models whose
    difference overflows fp32."""
    base, experts = models("normal", 3, n, dtype, generator)
    cases = []
    for bad in (float("nan"), float("inf")):
        poisoned = [x.clone() for x in experts]
        poisoned[2][n - 1] = bad
        cases.append((base, poisoned, r"experts\[2\] contains"))
        bad_base = base.clone()
        bad_base[5] = -bad
        cases.append((bad_base, experts, r"^base contains"))
    if dtype != torch.float16:  # an fp16 difference always fits fp32
        far, base_far = [x.clone() for x in experts], base.clone()
        far[1][3], base_far[3] = torch.finfo(dtype).max, -torch.finfo(dtype).max
        cases.append((base_far, far, r"task_vectors\[1\] contains"))
    return cases


@pytest.mark.parametrize("backend", ["torch", *fast_backends()])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nonfinite_inputs_are_named(backend, dtype, generator):
    """NaN/Inf in the base, an expert or a task vector: every models op raises NonFiniteError
    naming it (the selector names the expert by its label)."""
    device = device_for(backend)
    n = 2 * BLOCK + 37
    for base, experts, message in nonfinite_cases(dtype, n, generator):
        b, ex = on(device, base, experts)
        mtl = torch.zeros(n, device=device)
        calls = [
            lambda: ops.ties_merge_pass_models(b, ex, [0.1] * 3, fill_sign=0, backend=backend),
            lambda: ops.ties_merge_models(b, ex, keep=0.5, backend=backend),
            lambda: ops.tall_masks_models(b, ex, mtl, 0.4, backend=backend),
            lambda: ops.consensus_merge_models(b, ex, mtl, 0.4, backend=backend),
        ]
        for call in calls:
            with pytest.raises(ops.NonFiniteError, match=message) as err:
                call()
            assert not isinstance(err.value, NonFiniteResultError)
        t = 2 if "experts" in message else 1
        label = message.replace(r"experts\[2\]", "x2").replace(r"task_vectors\[1\]", r"x1 - base")
        with pytest.raises(ops.NonFiniteError, match=label):
            ops.MagnitudeSelector(device, backend=backend).count_models(b, ex[t], f"x{t}")
        with pytest.raises(ops.NonFiniteError, match=label.replace("x2", "expert").replace("x1", "expert")):
            ops.magnitude_threshold_models(b, ex[t], 0.5, backend=backend)


@pytest.mark.parametrize("backend", fast_backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_overflowing_results(backend, dtype, generator):
    """Finite models whose merge overflows the output dtype (or fp32 too): NonFiniteResultError
    with the reference's dtype and hint, in a full block and a partial one."""
    device = device_for(backend)
    n = 2 * BLOCK + 37
    base, experts = models("normal", 3, n, dtype, generator)
    big = torch.finfo(dtype).max
    for x in (base, *experts):
        x[[5, n - 1]] = big / 2
    experts[0][[5, n - 1]] = big
    tv = model_task_vectors(base, experts)
    b, ex = on(device, base, experts)
    for lam, out_dtype in ((2.0, None), (1e38, torch.float32)):
        with pytest.raises(NonFiniteResultError) as old:
            ops.ties_merge(tv, [0.0] * 3, base=base, lam=lam, out_dtype=out_dtype or dtype, backend="torch")
        with pytest.raises(NonFiniteResultError) as new:
            ops.ties_merge_models(b, ex, thresholds=[0.0] * 3, lam=lam, out_dtype=out_dtype, backend=backend)
        assert (new.value.dtype, new.value.fits) == (old.value.dtype, old.value.fits)
        first = ops.ties_merge_pass_models(b, ex, [0.0] * 3, fill_sign=1, lam=lam, out_dtype=out_dtype,
                                           check_result=False, backend=backend)
        assert first.overflow


def zero_sign_models(dtype, majority, generator, nblocks=9):
    """Models whose task vectors cancel exactly (+a, -a) in blocks 1, 4 and the partial last one
    only: many zero elected signs with kept entries there; elsewhere one expert decides, with
    sign ``majority`` in most elements."""
    n = nblocks * BLOCK - 100
    base = (torch.randint(-8, 9, (n,), generator=generator) * 0.25).to(dtype)  # base + a exact in every dtype
    a = nasty("ties", (n,), dtype, generator).float()
    lead = majority * torch.rand(n, generator=generator).add(0.5)
    lead[torch.rand(n, generator=generator) < 0.2] *= -1
    taus = [a, -a, torch.zeros(n)]
    amb = torch.zeros(n, dtype=torch.bool)
    for blk in (1, 4, nblocks - 1):
        amb[blk * BLOCK:(blk + 1) * BLOCK] = True
    taus[0] = torch.where(amb, a, lead)
    taus[1] = torch.where(amb, -a, torch.zeros(n))
    taus[2] = torch.where(amb, torch.zeros(n), lead * 0.5)
    experts = [(base.float() + tau.to(dtype).float()).to(dtype) for tau in taus]
    return base, experts


@pytest.mark.parametrize("backend", ["torch", *fast_backends()])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("majority", (-1, 1))
def test_zero_sign_rule_reruns_only_ambiguous_blocks(backend, dtype, majority, generator):
    """The first pass reports the blocks holding ambiguous elements (the reference's); rerunning
    just those with the majority sign gives the result of a full majority pass, leaves the other
    blocks of ``out`` untouched, and ties_merge / ties_merge_models (which do this) equal the
    TIES recipe for every disjoint mode, stacked and from the models."""
    device = device_for(backend)
    base, experts = zero_sign_models(dtype, majority, generator)
    n = base.numel()
    tv = model_task_vectors(base, experts)
    b, ex = on(device, base, experts)
    for disjoint in ("mean", "sum", "max"):
        kw = dict(disjoint=disjoint, backend=backend)
        first = ops.ties_merge_pass_models(b, ex, [0.0] * 3, fill_sign=0, check_result=False, **kw)
        assert first.ambiguous > 1000 and (first.sign_sum > 0) - (first.sign_sum < 0) == majority
        assert first.ambiguous_blocks == (1, 4, 8)
        full = ops.ties_merge_pass(tv, [0.0] * 3, fill_sign=majority, base=base, disjoint=disjoint, backend="torch")
        out = torch.full((n,), float("nan"), dtype=dtype, device=device)
        rerun = ops.ties_merge_pass_models(b, ex, [0.0] * 3, fill_sign=majority, out=out, blocks=[1, 4, 8], **kw)
        inside = torch.zeros(n, dtype=torch.bool)
        for blk in (1, 4, 8):
            inside[blk * BLOCK:(blk + 1) * BLOCK] = True
        assert torch.equal(out.cpu()[inside], full.merged[inside]) and bool(out.cpu()[~inside].isnan().all())
        assert rerun.ambiguous == first.ambiguous and rerun.ambiguous_blocks is None
        expected = ops.ties_merge(tv, [0.0] * 3, base=base, disjoint=disjoint, backend="torch")
        assert torch.equal(expected, full.merged) or disjoint != "max" and majority == -1
        for got in (ops.ties_merge_models(b, ex, thresholds=[0.0] * 3, **kw),
                    ops.ties_merge(tv.to(device), [0.0] * 3, base=b, **kw)):
            assert torch.equal(got.cpu(), expected), disjoint
    with pytest.raises(ValueError, match="pass that result as out="):
        ops.ties_merge_pass_models(b, ex, [0.0] * 3, fill_sign=1, blocks=[0], backend=backend)
    with pytest.raises(ValueError, match=r"blocks holds 9, outside \[0, 9\)"):
        ops.ties_merge_pass_models(b, ex, [0.0] * 3, fill_sign=1, blocks=[0, 9], out=out, backend=backend)


@pytest.mark.parametrize("backend", fast_backends())
def test_complete_ties_pass_reruns_blocks(backend, monkeypatch, generator):
    """ties_merge_models hands the first pass's ambiguous blocks to the rerun (not every block)."""
    base, experts = on(device_for(backend), *zero_sign_models(torch.float32, 1, generator))
    module, _ = kernels.load(backend)
    calls = []
    real = module.ties_merge_models

    def spy(*args, **kwargs):
        calls.append(args[-2])
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "ties_merge_models", spy)
    ops.ties_merge_models(base, experts, thresholds=[0.0] * 3, backend=backend)
    assert calls[0] is None and calls[1].tolist() == [1, 4, 8] and len(calls) == 2


SAMPLED = [0, 16]  # the blocks that ``_predicted_majority`` samples of 32


def sampled_majority_models(dtype, majority, sample_sign, generator, nblocks=32):
    """Models of ``nblocks`` blocks, each opening with 100 exactly cancelled elements (ambiguous);
    elsewhere one expert decides, with sign ``majority``, except in the blocks that
    ``_predicted_majority`` samples, where it is ``sample_sign``."""
    n = nblocks * BLOCK
    base = (torch.randint(-8, 9, (n,), generator=generator) * 0.25).to(dtype)
    a = nasty("ties", (n,), dtype, generator).float()
    sign = torch.full((nblocks,), float(majority))
    sign[SAMPLED] = sample_sign
    lead = sign.repeat_interleave(BLOCK) * torch.rand(n, generator=generator).add(0.5)
    amb = (torch.arange(n) % BLOCK) < 100
    taus = [torch.where(amb, a, lead), torch.where(amb, -a, torch.zeros(n))]
    return base, [(base.float() + tau.to(dtype).float()).to(dtype) for tau in taus]


@pytest.mark.parametrize("backend", fast_backends())
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("majority", (-1, 1))
@pytest.mark.parametrize("sample_agrees", (True, False))
def test_first_pass_fills_with_a_sampled_majority(backend, dtype, majority, sample_agrees, monkeypatch, generator):
    """TIES over one tensor (``fill_sign="sample"``) first runs its sampled blocks, then one pass
    filled with their majority: nothing reruns when the sample's majority is the tensor's (either
    sign); when the sample misleads, the ambiguous blocks rerun with the tensor's majority. The
    result is the reference's either way, and every disjoint mode's."""
    base, experts = sampled_majority_models(dtype, majority, majority if sample_agrees else -majority, generator)
    tv = model_task_vectors(base, experts)
    b, ex = on(device_for(backend), base, experts)
    module, _ = kernels.load(backend)
    calls = []
    real = module.ties_merge_models

    def spy(*args, **kwargs):
        calls.append((args[-3], None if args[-2] is None else args[-2].tolist()))
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "ties_merge_models", spy)
    for disjoint in ("mean", "max"):
        calls.clear()
        got = ops.ties_merge_models(b, ex, thresholds=[0.0, 0.0], disjoint=disjoint, backend=backend)
        expected = ops.ties_merge(tv, [0.0, 0.0], base=base, disjoint=disjoint, backend="torch")
        assert torch.equal(got.cpu(), expected), disjoint
        fill = majority if sample_agrees else -majority
        assert calls[:2] == [(0, SAMPLED), (fill, None)]
        assert calls[2:] == ([] if sample_agrees else [(majority, list(range(32)))])
    assert ops.ties_merge_pass_models(b, ex, [0.0, 0.0], fill_sign="sample", backend=backend).fill_sign == fill
    assert ops.ties_merge_pass_models(base, experts, [0.0, 0.0], fill_sign="sample", backend="torch").fill_sign == 0
    with pytest.raises(ValueError, match="fill_sign='sample' predicts a whole tensor's majority"):
        ops.ties_merge_pass_models(b, ex, [0.0, 0.0], fill_sign="sample", out=got, blocks=[0], backend=backend)


@pytest.mark.parametrize("backend", fast_backends())
def test_models_ops_never_build_task_vectors(backend, monkeypatch, generator):
    """Every models op runs its models kernel: the stacked-task-vector kernels and the fp32 task
    vectors are never used (each would fail here), and the results are the reference's."""
    device = device_for(backend)
    module, _ = kernels.load(backend)
    for name in ("ties_merge", "task_arithmetic", "tall_masks", "consensus", "hist_magnitude", "hist_magnitude_low"):
        monkeypatch.setattr(module, name, lambda *a, _name=name, **k: pytest.fail(f"stacked kernel {_name} ran"))
    base, experts = models("mixed", 3, 2 * BLOCK + 37, torch.bfloat16, generator)
    mtl = ops.task_arithmetic(model_task_vectors(base, experts), backend="torch")
    calls = {
        "task_arithmetic": lambda b, e, be: ops.task_arithmetic_models(b, e, weights=[0.5, -1.0, 2.0], backend=be),
        "ties": lambda b, e, be: ops.ties_merge_models(b, e, keep=0.3, backend=be),
        "tall": lambda b, e, be: ops.tall_masks_models(b, e, mtl.to(b.device), [0.2, 0.4, 1.0], backend=be),
        "consensus": lambda b, e, be: ops.consensus_merge_models(b, e, mtl.to(b.device), 0.4, backend=be),
    }
    with monkeypatch.context() as m:
        for where in ("dare.model_task_vectors", "selection.model_task_vectors", "tall.model_task_vectors",
                      "tall.via_task_vectors", "ties.via_task_vectors"):
            m.setattr(f"nlmerge.ops.{where}", lambda *a, _w=where, **k: pytest.fail(f"{_w}: fp32 task vectors built"))
        got = {name: call(*on(device, base, experts), backend).cpu() for name, call in calls.items()}
    for name, call in calls.items():
        assert torch.equal(got[name], call(base, experts, "torch")), name


@needs_cpu
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_models_kernels_thread_count_free(dtype, generator):
    """1 and 2 OpenMP threads write the same bits and counts (blocks split between threads)."""
    base, experts = models("mixed", 3, 300_007, dtype, generator)
    thr = thresholds_of(base, experts)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            p = ops.ties_merge_pass_models(base, experts, thr, fill_sign=0, out_dtype=torch.float32, backend="cpu")
            results.append((p, ops.magnitude_threshold_models(base, experts[1], 0.2, backend="cpu")))
    finally:
        torch.set_num_threads(threads)
    (p1, t1), (p2, t2) = results
    assert torch.equal(p1.merged, p2.merged) and p1[1:3] == p2[1:3] and torch.equal(t1, t2)
    assert p1.ambiguous_blocks == p2.ambiguous_blocks
