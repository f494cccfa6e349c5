"""pytest-benchmark cases of the merge ops (not part of the test suite: run
``python -m pytest benchmarks --benchmark-only``). For ratios against the memory floor and a
FusionBench-style implementation in one run, use ``benchmarks/bench_merge.py``."""
import pytest
import torch

from nlmerge import ops
from nlmerge.ops import _dispatch

N = 1 << 22
TASKS = 4
BACKENDS = ["torch", _dispatch.resolve(None, torch.device("cpu"), "benchmark")[0]]


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16], ids=str)
def task_vectors(request):
    return torch.randn(TASKS, N, generator=torch.Generator().manual_seed(0)).to(request.param)


@pytest.mark.parametrize("backend", sorted(set(BACKENDS)))
def test_magnitude_threshold(benchmark, task_vectors, backend):
    benchmark(ops.magnitude_threshold, task_vectors[0], 0.2, backend=backend)


@pytest.mark.parametrize("backend", sorted(set(BACKENDS)))
def test_ties_merge(benchmark, task_vectors, backend):
    thresholds = [ops.magnitude_threshold(tau, 0.2) for tau in task_vectors]
    benchmark(ops.ties_merge, task_vectors, thresholds, backend=backend)


@pytest.mark.parametrize("backend", sorted(set(BACKENDS)))
def test_task_arithmetic(benchmark, task_vectors, backend):
    benchmark(ops.task_arithmetic, task_vectors, lam=0.3, backend=backend)


@pytest.mark.parametrize("backend", sorted(set(BACKENDS)))
def test_tall_masks(benchmark, task_vectors, backend):
    mtl = ops.task_arithmetic(task_vectors)
    benchmark(ops.tall_masks, task_vectors, mtl, 0.4, backend=backend)
