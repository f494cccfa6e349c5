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
