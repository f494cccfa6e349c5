"""nlmerge.ops.random: Philox4x32-10 against Random123's known answers and Triton's tl.philox;
draws that are a pure function of (seed, name, stream, index); uniformity of 1e6 draws; the C++
backend bit-identical to the torch reference (any thread count, any cut of the range)."""
import numpy as np
import pytest
import torch
from conftest import ON_GPU

from nlmerge import kernels
from nlmerge.ops import random as rnd

cpu_kernels, cpu_reason = kernels.load("cpu")
needs_cpu = pytest.mark.skipif(cpu_kernels is None, reason=f"C++ extension not built: {cpu_reason}")

# Random123's kat_vectors for philox4x32-10: counter, key, result
KNOWN_ANSWERS = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0), (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter, key, expected", KNOWN_ANSWERS)
def test_philox_known_answers(counter, key, expected):
    assert rnd.philox4x32(counter, key) == expected  # Python ints
    as_tensors = rnd.philox4x32(tuple(torch.tensor([c]) for c in counter), key)
    assert [int(x) for x in as_tensors] == list(expected)  # int64 tensors: no overflow on the way


def test_philox_equals_tritons():
    """A Triton kernel can draw the same words with ``tl.philox`` (in the interpreter here)."""
    triton = pytest.importorskip("triton")
    import triton.language as tl

    @triton.jit
    def draw(out, seed, c0_ptr, c1_ptr, c2_ptr, c3_ptr, N: tl.constexpr):
        i = tl.arange(0, N)
        a, b, c, d = tl.philox(seed, tl.load(c0_ptr + i), tl.load(c1_ptr + i), tl.load(c2_ptr + i), tl.load(c3_ptr + i))
        for lane, x in ((0, a), (1, b), (2, c), (3, d)):
            tl.store(out + lane * N + i, x)

    device = "cuda" if ON_GPU else "cpu"
    counters = torch.randint(0, 2**32, (4, 8), generator=torch.Generator().manual_seed(1), dtype=torch.int64)
    as_int32 = [(c - (c >= 2**31).long() * 2**32).to(torch.int32).to(device) for c in counters]
    k0, k1, _ = rnd.stream_key(7, "layers.3.weight")
    out = torch.zeros(32, dtype=torch.int32, device=device)
    draw[(1,)](out, (k1 << 32) | k0, *as_int32, N=8)
    expected = torch.stack(rnd.philox4x32(tuple(counters), (k0, k1)))
    assert torch.equal(out.cpu().long().view(4, 8) & 0xFFFFFFFF, expected)


def test_chunks_draw_what_the_whole_draws(monkeypatch):
    whole = rnd.random_bits(3, "w", 1000, stream=2)
    assert whole.dtype == torch.int64 and int(whole.min()) >= 0 and int(whole.max()) < 2**24
    monkeypatch.setattr(rnd, "_BLOCK", 5)  # many blocks, ends inside and across counters
    for start, stop in ((0, 1000), (0, 1), (1, 2), (3, 9), (7, 35), (397, 1000), (999, 1000)):
        assert torch.equal(rnd.random_bits(3, "w", stop - start, offset=start, stream=2), whole[start:stop])
    mask = rnd.keep_mask(3, "w", (10, 100), 0.4, stream=2)
    chunks = [rnd.keep_mask(3, "w", (n, 100), 0.4, offset=100 * r, stream=2) for r, n in ((0, 3), (3, 6), (9, 1))]
    assert torch.equal(torch.cat(chunks), mask)
    assert torch.equal(mask.reshape(-1), whole < 0.4 * 2**24)


def test_independent_of_torchs_random_state():
    torch.manual_seed(0)
    first = rnd.uniform(11, "a", 257)
    torch.manual_seed(12345)
    torch.rand(10)
    assert torch.equal(rnd.uniform(11, "a", 257), first)


def test_seeds_names_and_streams_give_different_draws():
    draws = [
        rnd.random_bits(seed, name, 4096, stream=stream, offset=offset)
        for seed, name, stream, offset in ((0, "a", 0, 0), (1, "a", 0, 0), (0, "b", 0, 0), (0, "a", 1, 0), (0, "a", 0, 4096), (2**64 - 1, "a", 0, 0))
    ]
    for i in range(len(draws)):
        for j in range(i):
            assert (draws[i] == draws[j]).float().mean() < 0.01, (i, j)  # 24-bit values: ~0 coincide


def test_uniform_and_kept_fraction_of_a_million_draws():
    n, bins = 10**6, 1000
    u = rnd.uniform(2024, "model.embed_tokens.weight", n, offset=123)
    assert u.dtype == torch.float32 and float(u.min()) >= 0.0 and float(u.max()) < 1.0
    counts = torch.bincount((u * bins).long(), minlength=bins).double()
    chi2 = float(((counts - n / bins) ** 2 / (n / bins)).sum())
    assert abs(chi2 - (bins - 1)) < 5 * (2 * (bins - 1)) ** 0.5  # chi-square, 999 degrees of freedom: sd 44.7
    for density in (0.1, 0.5, 0.9):
        kept = float(rnd.keep_mask(2024, "model.embed_tokens.weight", n, density, offset=123).double().mean())
        assert abs(kept - density) < 5 * (density * (1 - density) / n) ** 0.5  # 5 sd
    # consecutive draws are not correlated (lag-1 and lag-4, the lanes of one counter)
    centered = u.double() - 0.5
    for lag in (1, 4):
        corr = float((centered[:-lag] * centered[lag:]).mean() / centered.var())
        assert abs(corr) < 5 / n**0.5


def test_keep_mask_edges():
    assert not rnd.keep_mask(1, "x", (3, 4), 0.0).any()
    assert rnd.keep_mask(1, "x", (3, 4), 1.0).all()
    assert rnd.keep_mask(1, "x", (0, 4), 0.5).shape == (0, 4)
    bits = rnd.random_bits(1, "x", 100)
    # keep iff bits < ceil(density * 2**24): exactly the uniform's u < density
    density = (int(bits[0]) + 0.5) / 2**24
    mask = rnd.keep_mask(1, "x", 100, density)
    assert torch.equal(mask, rnd.uniform(1, "x", 100) < density) and bool(mask[0])


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: rnd.random_bits(-1, "x", 4), r"seed must be an integer in \[0, 2\*\*64\), got -1"),
        (lambda: rnd.random_bits(2**64, "x", 4), r"seed must be an integer"),
        (lambda: rnd.random_bits(1.5, "x", 4), r"seed must be an integer"),
        (lambda: rnd.random_bits(0, "x", 4, offset=-1), r"offset must be an integer in \[0, "),
        (lambda: rnd.random_bits(0, "x", -4), r"count must be an integer in \[0, "),
        (lambda: rnd.random_bits(0, "x", 4, stream=2**32), r"stream must be an integer in \[0, 4294967296\)"),
        (lambda: rnd.random_bits(0, "x", 4, offset=2**62 - 2), r"offset \+ count = .* exceeds"),
        (lambda: rnd.keep_mask(0, "x", 4, 1.5), r"density must be in \[0, 1\].*got 1.5"),
        (lambda: rnd.keep_mask(0, "x", 4, float("nan")), r"density must be in \[0, 1\]"),
    ],
)
def test_errors_name_the_argument(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_name_must_be_a_string():
    with pytest.raises(TypeError, match="name must be a string"):
        rnd.random_bits(0, 3, 4)


@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device")
def test_cuda_draws_equal_cpu_draws():
    assert torch.equal(rnd.random_bits(5, "w", 10**5, offset=9, stream=1, device="cuda").cpu(), rnd.random_bits(5, "w", 10**5, offset=9, stream=1))


def _all_draws(backend, seed, name, count, offset, stream, density):
    """random_bits, uniform and keep_mask of one range on one backend."""
    return (
        rnd.random_bits(seed, name, count, offset=offset, stream=stream, backend=backend),
        rnd.uniform(seed, name, count, offset=offset, stream=stream, backend=backend),
        rnd.keep_mask(seed, name, count, density, offset=offset, stream=stream, backend=backend),
    )


def _assert_same(got, expected, what):
    for g, e, op in zip(got, expected, ("random_bits", "uniform", "keep_mask")):
        assert g.dtype == e.dtype and g.shape == e.shape, (op, what, g.dtype, g.shape)
        assert torch.equal(g, e), (op, what, int((g != e).sum()))


def _random_cases(generator, n_cases):
    """(seed, name, count, offset, stream, density): fresh keys; counts 0, 1, 3 and odd ones;
    offsets off multiples of 4, at the 2**32-th counter (the counter's second word) and near 2**62."""
    def draw(high):
        return int(torch.randint(0, high, (), generator=generator, dtype=torch.int64))

    counts = [0, 1, 2, 3, 4, 5, 17, 4099] + [draw(20_000) for _ in range(n_cases - 8)]
    offset_bases = [0, 4 * 2**32 - 9, 2**62 - 30_000, 2**40]
    cases = []
    for k, count in enumerate(counts):
        seed = draw(2**62) * 4 + draw(4)  # up to 2**64 - 1
        name = f"model.layers.{draw(100)}.mlp.{'é' * (k % 2)}w"
        offset = offset_bases[k % len(offset_bases)] + draw(1000)
        offset = min(offset, 2**62 - count)
        cases.append((seed, name, count, offset, draw(2**32), float(torch.rand((), generator=generator))))
    return cases


@needs_cpu
def test_cpu_draws_equal_the_reference(generator):
    for case in _random_cases(generator, 24):
        _assert_same(_all_draws("cpu", *case), _all_draws("torch", *case), case)
    # densities at the integer threshold's edges: 0, 1, and one draw's own value
    bits = rnd.random_bits(3, "edge", 64, backend="torch")
    for density in (0.0, 1.0, int(bits[5]) / 2**24, (int(bits[5]) + 1) / 2**24, 2**-24, 1 - 2**-24):
        assert torch.equal(rnd.keep_mask(3, "edge", (8, 8), density, backend="cpu"), rnd.keep_mask(3, "edge", (8, 8), density, backend="torch")), density


@needs_cpu
def test_cpu_draws_do_not_depend_on_threads_or_chunks(generator):
    seed, name, offset, stream = int(torch.randint(0, 2**62, (), generator=generator)), "embed.weight", 4 * 2**32 - 70_001, 3
    count = 300_007  # enough elements for several threads
    expected = _all_draws("torch", seed, name, count, offset, stream, 0.35)
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3, 5):
            torch.set_num_threads(n)
            _assert_same(_all_draws("cpu", seed, name, count, offset, stream, 0.35), expected, f"{n} threads")
    finally:
        torch.set_num_threads(threads)
    # cut at arbitrary points (inside counters, across the kernel's chunks) and concatenated
    cuts = sorted({0, count, 1, 2, 4097, 4100, count - 3, *torch.randint(0, count, (6,), generator=generator).tolist()})
    pieces = [_all_draws("cpu", seed, name, b - a, offset + a, stream, 0.35) for a, b in zip(cuts, cuts[1:])]
    _assert_same([torch.cat(parts) for parts in zip(*pieces)], expected, "chunks")


@needs_cpu
def test_auto_backend_uses_the_cpu_kernel_on_cpu_tensors(monkeypatch):
    calls = []
    real = cpu_kernels.random_draws
    monkeypatch.setattr(cpu_kernels, "random_draws", lambda out, *args: calls.append(out.dtype) or real(out, *args))
    monkeypatch.delenv("NLMERGE_BACKEND", raising=False)
    mask = rnd.keep_mask(1, "x", (3, 5), 0.5)
    rnd.random_bits(1, "x", 15)
    rnd.random_bits(1, "x", 15, backend="torch")
    assert calls == [torch.bool, torch.int64]
    assert torch.equal(mask, rnd.keep_mask(1, "x", (3, 5), 0.5, backend="torch"))


@needs_cpu
def test_cpu_binding_refuses_bad_buffers():
    from nlmerge import _C

    with pytest.raises(ValueError, match="out must be int64 .* got dtype kind 'i' itemsize 4"):
        _C.random_draws(np.zeros(4, np.int32), 1, 2, 0, 3, 0)
    with pytest.raises(ValueError, match=r"threshold in \[0, 2\*\*24\], got -1"):
        _C.random_draws(np.zeros(4, np.bool_), 1, 2, 0, 3, 0)
    with pytest.raises(ValueError, match=r"offset \+ out.size <= 2\*\*62, got offset 4611686018427387901 for 4"):
        _C.random_draws(np.zeros(4, np.int64), 1, 2, 0, 3, 2**62 - 3)
    with pytest.raises(ValueError, match="out must be writable"):
        frozen = np.zeros(4, np.float32)
        frozen.flags.writeable = False
        _C.random_draws(frozen, 1, 2, 0, 3, 0)


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match=r"backend='numpy' is not a backend"):
        rnd.keep_mask(0, "x", 4, 0.5, backend="numpy")

