"""kth_smallest_magnitudes_models: T tasks' exact thresholds in one read of the models, bit-identical
to the reference selection in each fp32 task vector (and so to T calls of
kth_smallest_magnitude_models), whether the sample's windows hold the k-th magnitudes or miss."""
import pytest
import torch

from conftest import DTYPES, device_for, fast_backends
from nlmerge import ops
from nlmerge.ops import selection
from nlmerge.ops.selection import kth_smallest_magnitude_reference, sample_positions


def _reference(base, experts, ks):
    return torch.stack([
        kth_smallest_magnitude_reference([x.reshape(-1).float() - base.reshape(-1).float()], k)
        for x, k in zip(experts, ks)])


@pytest.fixture
def fallbacks(monkeypatch):
    """Counts the tasks that fell back to the two histogram passes."""
    calls = []
    two_passes = selection._two_passes_models

    def counted(kernels, pairs, k):
        calls.append(k)
        return two_passes(kernels, pairs, k)

    monkeypatch.setattr(selection, "_two_passes_models", counted)
    return calls


def _models(kind, n, dtype, num, generator):
    """A base ~N(0, 0.02) and ``num`` experts of one kind of task vector."""
    base = torch.randn(n, generator=generator) * 0.02
    experts = []
    for _ in range(num):
        if kind == "normal":  # fp32-precise differences: few ties
            x = base + torch.randn(n, generator=generator) * 1e-3
        elif kind == "rounded":  # differences of rounded values: many ties
            x = (base + torch.randn(n, generator=generator) * 1e-3).to(dtype).float()
        elif kind == "sparse":  # 60 % of the elements unchanged: zeros at the threshold's rank
            x = base + torch.randn(n, generator=generator) * 1e-3 * (torch.rand(n, generator=generator) < 0.4)
        elif kind == "denormal":  # fp32 differences below the smallest normal
            x = base + torch.randn(n, generator=generator) * 1e-39
        else:  # "equal": every magnitude the same
            x = base + 0.25
        experts.append(x.to(dtype))
    return base.to(dtype), experts


@pytest.mark.parametrize("backend", fast_backends())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["normal", "rounded", "sparse", "denormal", "equal"])
def test_equals_reference(backend, dtype, kind, generator, fallbacks):
    if kind == "denormal" and dtype != torch.float32:
        pytest.skip("fp16/bf16 models cannot hold a 1e-39 difference")
    device = device_for(backend)
    for n in ([1, 5, 1031] if backend == "triton" and device == "cpu" else [1, 1031, 300_007]):
        base, experts = _models(kind, n, dtype, 3, generator)
        ks = [1, n, max(1, int(0.7 * n))]  # both ends and a TIES trim's rank
        base, experts = base.to(device), [x.to(device) for x in experts]
        got = ops.kth_smallest_magnitudes_models(base, experts, ks, backend=backend)
        assert fallbacks == [], fallbacks  # ordinary data: the windows held every threshold
        assert got.dtype == torch.float32 and got.shape == (3,)
        assert torch.equal(got.cpu(), _reference(base.cpu(), [x.cpu() for x in experts], ks)), (n, ks)
        single = [ops.kth_smallest_magnitude_models(base, x, k, backend=backend) for x, k in zip(experts, ks)]
        assert torch.equal(got, torch.stack(single))
        fallbacks.clear()


@pytest.mark.parametrize("backend", fast_backends())
def test_misleading_sample_falls_back(backend, generator, fallbacks):
    """Elements at the sample's positions 100x larger than all others: the sample brackets the
    wrong magnitudes, the window misses, the task's two passes give the exact threshold; an
    ordinary task beside it keeps its window."""
    device = device_for(backend)
    n = 20_000 if backend == "triton" and device == "cpu" else 1 << 20
    base = torch.zeros(n)
    misled = torch.rand(n, generator=generator) * 1e-3 + 1e-3
    stride = max(selection.WINDOWS_MIN_STRIDE, n // selection.WINDOWS_SAMPLE)
    misled[sample_positions(n, stride)] *= 100
    ordinary = torch.rand(n, generator=generator)
    ks = [n // 2, n // 2]
    base, experts = base.to(device), [misled.to(device), ordinary.to(device)]
    got = ops.kth_smallest_magnitudes_models(base, experts, ks, backend=backend)
    assert torch.equal(got.cpu(), _reference(base.cpu(), [x.cpu() for x in experts], ks))
    assert fallbacks == [n // 2]


@pytest.mark.parametrize("backend", fast_backends()[:1])  # the CPU's
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["normal", "rounded", "sparse"])
def test_many_candidates_are_selected_among_by_radix(backend, dtype, kind, generator, fallbacks, monkeypatch):
    """The CPU selects among many candidates by radix histograms (introselect for few): forced
    for every window here, still bit-identical to the reference, in windows held by the sample."""
    monkeypatch.setattr(selection, "PARTITION_MAX", 0)
    radix = []
    select = selection._radix_select
    monkeypatch.setattr(selection, "_radix_select", lambda xs, k, *a: radix.append(k) or select(xs, k, *a))
    n = 300_007
    base, experts = _models(kind, n, dtype, 3, generator)
    ks = [max(1, int(f * n)) for f in (0.3, 0.7, 0.9)]
    got = ops.kth_smallest_magnitudes_models(base, experts, ks, backend=backend)
    assert torch.equal(got, _reference(base, experts, ks)), ks
    assert fallbacks == [] and radix, (fallbacks, radix)


@pytest.mark.parametrize("backend", fast_backends())
def test_candidate_overflow_falls_back(backend, generator, fallbacks, monkeypatch):
    """No room for candidates: they overflow, the task falls back."""
    monkeypatch.setattr(selection, "_CANDIDATE_SLACK", 0)
    monkeypatch.setattr(selection, "_CANDIDATE_FACTOR", 0)
    device = device_for(backend)
    n = 4099 if backend == "triton" and device == "cpu" else 1 << 16
    base = torch.zeros(n, device=device)
    expert = torch.rand(n, generator=generator).to(device)
    got = ops.kth_smallest_magnitudes_models(base, [expert], [n // 3], backend=backend)
    assert torch.equal(got.cpu(), _reference(base.cpu(), [expert.cpu()], [n // 3]))
    assert fallbacks == [n // 3]


@pytest.mark.parametrize("backend", ["torch", *fast_backends()])
@pytest.mark.parametrize("where", ["base", "expert", "overflow"])
@pytest.mark.parametrize("sampled", [True, False])
def test_nonfinite_inputs_are_named(backend, where, sampled, generator):
    """NaN/Inf found by the sample or by the pass: NonFiniteError naming the base, expert t or
    task vector t."""
    device = device_for(backend)
    n = 3000
    base = torch.randn(n, generator=generator)
    experts = [base + torch.randn(n, generator=generator) for _ in range(3)]
    stride = max(selection.WINDOWS_MIN_STRIDE, n // selection.WINDOWS_SAMPLE)
    positions = sample_positions(n, stride)
    i = int(positions[1]) if sampled else int(positions[1]) + 1
    if where == "base":
        base[i], expected = float("nan"), ("base", None)
    elif where == "expert":
        experts[2][i], expected = float("inf"), ("experts", 2)
    else:  # finite inputs whose difference overflows fp32
        base[i], experts[1][i], expected = -3e38, 3e38, ("task_vectors", 1)
    base, experts = base.to(device), [x.to(device) for x in experts]
    with pytest.raises(ops.NonFiniteError) as info:
        ops.kth_smallest_magnitudes_models(base, experts, [1, n // 2, n], backend=backend)
    assert (info.value.tensor, info.value.task) == expected


def test_bad_arguments():
    base, expert = torch.zeros(10), torch.ones(10)
    with pytest.raises(ValueError, match=r"ks\[1\] must be an integer in \[1, 10\], got 11"):
        ops.kth_smallest_magnitudes_models(base, [expert, expert], [1, 11])
    with pytest.raises(ValueError, match="ks must be a sequence of 2 ranks"):
        ops.kth_smallest_magnitudes_models(base, [expert, expert], [1])
    with pytest.raises(ValueError, match=r"experts\[0\] has shape \(9,\)"):
        ops.kth_smallest_magnitudes_models(base, [torch.ones(9)], [1])
    with pytest.raises(ValueError, match="no elements"):
        ops.kth_smallest_magnitudes_models(torch.zeros(0), [torch.zeros(0)], [1])


# ---- magnitude_thresholds_models: T tasks' TIES thresholds over one tensor or several together ----

def _tensor_thresholds_reference(bases, experts, keeps):
    """Each task's threshold by the reference selection over its fp32 task vectors taken together."""
    return torch.stack([ops.magnitude_threshold_models(bases, task, keep, backend="torch")
                        for task, keep in zip(experts, keeps)])


@pytest.mark.parametrize("backend", fast_backends())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["normal", "rounded", "sparse", "equal"])
def test_thresholds_over_several_tensors_equal_reference(backend, dtype, kind, generator, fallbacks):
    """Several keys taken together (the global TIES threshold), one keep per task (1.5: nothing
    trimmed, threshold 0): bit-identical to the reference task by task, with the candidates of all
    keys selected among together (no task falls back on ordinary data)."""
    device = device_for(backend)
    sizes = [7, 1031, 40] if backend == "triton" and device == "cpu" else [7, 1031, 300_007, 40]
    models = [_models(kind, n, dtype, 3, generator) for n in sizes]
    bases = [base.to(device) for base, _ in models]
    experts = [[experts[t].to(device) for _, experts in models] for t in range(3)]
    keeps = [0.2, 0.7, 1.5]
    got = ops.magnitude_thresholds_models(bases, experts, keeps, backend=backend)
    assert got.dtype == torch.float32 and got.shape == (3,) and float(got[2]) == 0.0
    cpu = lambda xs: [x.cpu() for x in xs]  # noqa: E731
    assert torch.equal(got.cpu(), _tensor_thresholds_reference(cpu(bases), [cpu(task) for task in experts], keeps))
    assert fallbacks == [] or kind == "equal", fallbacks


@pytest.mark.parametrize("backend", fast_backends())
@pytest.mark.parametrize("size", ["small", "large"])
def test_several_tensors_fall_back_when_candidates_overflow(backend, size, generator, fallbacks, monkeypatch):
    """Room for 64 candidates: task 0's overflow either within one tensor (large) or only once two
    tensors' candidates are put together (small: 40 each); it falls back to the two passes over all
    tensors, exact, while task 1 (no candidates: every magnitude 0, its window's edge) keeps its window."""
    monkeypatch.setattr(selection, "_CANDIDATE_FACTOR", 0)
    monkeypatch.setattr(selection, "_CANDIDATE_SLACK", 64)
    device = device_for(backend)
    n = 40 if size == "small" else 3000 if backend == "triton" and device == "cpu" else 50_000
    bases = [torch.zeros(n), torch.zeros(n)]
    crowded = [torch.rand(n, generator=generator) + 0.5, torch.rand(n, generator=generator) + 0.5]
    ordinary = [torch.zeros(n), torch.zeros(n)]
    ks = [n, n]
    bases = [b.to(device) for b in bases]
    experts = [[x.to(device) for x in crowded], [x.to(device) for x in ordinary]]
    got = ops.kth_smallest_magnitudes_models(bases, experts, ks, backend=backend)
    cpu = lambda xs: [x.cpu() for x in xs]  # noqa: E731
    want = torch.stack([kth_smallest_magnitude_reference([x - b for x, b in zip(cpu(task), cpu(bases))], k)
                        for task, k in zip(experts, ks)])
    assert torch.equal(got.cpu(), want)
    assert fallbacks == [n], fallbacks


@pytest.mark.parametrize("backend", ["torch", *fast_backends()])
def test_thresholds_over_one_tensor_equal_reference(backend, generator):
    """One tensor: every task's threshold (one keep for all) as the reference's."""
    device = device_for(backend)
    n = 2000 if backend == "triton" and device == "cpu" else 200_003
    base, experts = _models("rounded", n, torch.bfloat16, 4, generator)
    base, experts = base.to(device), [x.to(device) for x in experts]
    got = ops.magnitude_thresholds_models(base, experts, 0.3, backend=backend)
    want = _tensor_thresholds_reference([base.cpu()], [[x.cpu()] for x in experts], [0.3] * 4)
    assert torch.equal(got.cpu(), want)


def test_streaming_reads_each_key_once_per_pass_and_falls_back_when_missed(generator, monkeypatch):
    """The streaming protocol: two passes over the keys (sample, count) when every bracket holds its
    rank; when a bracket misses, the two histogram passes for that task only, still exact."""
    sizes = [5000, 777, 20_000]

    def tensor(n):  # magnitudes uniform in [1, 2): a bracket of a few high-bit bins holds any rank
        return (torch.rand(n, generator=generator) + 1) * torch.randn(n, generator=generator).sign()

    models = [(base, [base + tensor(n) for _ in range(2)]) for n in sizes for base in [torch.randn(n, generator=generator)]]
    ranks = [sum(sizes) // 3, sum(sizes) * 4 // 5]
    passes = []

    def one_pass(what, count):
        passes.append(what)
        for base, experts in models:
            count(base, experts, ["a", "b"])

    def run():
        passes.clear()
        return ops.kth_smallest_magnitudes_streaming(ranks, one_pass, backend="cpu", sample_stride=4)

    want = torch.stack([
        kth_smallest_magnitude_reference([x - base for base, experts in models for x in experts[t:t + 1]], k)
        for t, k in enumerate(ranks)])
    assert torch.equal(run(), want) and passes == ["sample", "count"]
    hit = ops.MagnitudeSelector.hit
    misses = {"counted": 0}

    def first_task_misses(self):  # the first selector asked (task 0) misses; task 1 keeps its window
        misses["counted"] += 1
        return hit.fget(self) and misses["counted"] != 1

    monkeypatch.setattr(ops.MagnitudeSelector, "hit", property(first_task_misses))
    assert torch.equal(run(), want) and passes == ["sample", "count", "high bits", "low bits"]


@pytest.mark.parametrize("backend", fast_backends())
def test_thresholds_name_nonfinite_and_bad_arguments(backend, generator):
    """NaN in an untrimmed task (keep >= 1) is still refused; mismatched shapes name the task."""
    bases = [torch.randn(50, generator=generator), torch.randn(3, 4, generator=generator)]
    experts = [[b + 1 for b in bases], [b - 1 for b in bases]]
    experts[1][1][2, 3] = float("nan")
    with pytest.raises(ops.NonFiniteError):
        ops.magnitude_thresholds_models(bases, experts, [0.5, 2.0], backend=backend)
    with pytest.raises(ops.NonFiniteError):
        ops.magnitude_thresholds_models(bases, experts, 0.5, backend=backend)
    experts[1][1] = torch.randn(4, 3, generator=generator)
    with pytest.raises(ValueError, match=r"tensor 1: experts\[1\] has shape \(4, 3\)"):
        ops.magnitude_thresholds_models(bases, experts, 0.5, backend=backend)
    with pytest.raises(ValueError, match="one per task"):
        ops.magnitude_thresholds_models(bases, experts[:1], [0.5, 0.5], backend=backend)
    with pytest.raises(ValueError, match=r"keep\[0\] must be > 0"):
        ops.magnitude_thresholds_models(bases, experts[:1], 0.0, backend=backend)


@pytest.mark.parametrize("keep,error", [("0.3", r"keep\[0\] must be a real number, got '0.3'"),
                                        (True, r"keep\[0\] must be a real number, got True"),
                                        ([0.3, "x"], r"keep\[1\] must be a real number, got 'x'")])
def test_thresholds_refuse_keep_that_is_not_a_number(keep, error):
    base = torch.zeros(10)
    with pytest.raises(TypeError, match=error):
        ops.magnitude_thresholds_models(base, [base + 1, base - 1], keep)
