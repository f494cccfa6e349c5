"""Batched permutation gathers: every fast backend bit for bit against the index_select chain.

Inputs are random bit patterns (every NaN payload, signalling NaNs, infinities, denormals, -0),
fresh each run; results are compared as raw integer bits, and against the same chain run on the
integer view (which cannot touch a float). Triton runs in its interpreter: tiny shapes there.
"""
import pytest
import torch

from conftest import DTYPES, ON_GPU, device_for, fast_backends, nasty
from nlmerge import kernels
from nlmerge.ops.permute import _geometry, _normalize, permute_reference, permute_tensors

ALL_BACKENDS = [pytest.param("torch", id="torch")] + fast_backends()
BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
# a signalling NaN, a NaN with payload and sign, +Inf, the smallest denormal, -0 (raw bits)
SPECIAL = {
    torch.float32: [0x7F800001, -0x003FFFFF, 0x7F800000, 0x00000001, -0x80000000],
    torch.float16: [0x7C01, -0x0155, 0x7C00, 0x0001, -0x8000],
    torch.bfloat16: [0x7F81, -0x0055, 0x7F80, 0x0001, -0x8000],
}

# (shape, axes): axes given in the order of the pairs (the kernels sort them; negative allowed)
CASES = [
    ((7,), (0,)),
    ((1,), (0,)),
    ((4097,), (0,)),
    ((5, 7), (1,)),
    ((5, 7), (0, 1)),
    ((5, 7), (1, 0)),
    ((1, 7), (0, 1)),
    ((3, 4, 5), (0, 2)),
    ((3, 4, 5), (2, 0)),
    ((3, 4, 5), (1,)),
    ((6, 5, 3, 3), (0, 1)),
    ((6, 5, 3, 3), (0, 3)),
    ((6, 5, 3, 3), (1, 2)),
    ((6, 5, 3, 3), (3,)),
    ((2, 3, 4, 5), (1, 3)),
    ((2, 3, 4, 5), (-1,)),
    ((2, 3, 1, 5), (2, 0)),
    ((4, 3), ()),
    ((), ()),
    ((0, 3), (1,)),
    ((3, 0, 2), (0, 1)),
]
# sizes only the compiled backends see: long rows (sliced work items), threads, big gathers
BIG_CASES = [
    ((4097, 33), (0, 1)),
    ((2, 20000, 3), (1, 0)),
    ((3, 100000), (0,)),
    ((300000,), ()),
    ((7, 40000), (1,)),
    ((512, 256, 3, 3), (0, 1)),
    ((10, 512), (1,)),
]


def random_bits(shape, dtype, generator):
    """Uniformly random bit patterns of ``dtype`` (with the special patterns sprinkled in)."""
    n = int(torch.Size(shape).numel())
    width = 32 if dtype == torch.float32 else 16
    bits = torch.randint(-(2 ** (width - 1)), 2 ** (width - 1), (n,), generator=generator, dtype=torch.int64)
    special = torch.tensor(SPECIAL[dtype], dtype=torch.int64)
    if n:
        where = torch.randint(0, n, (min(n, 3 * len(special)),), generator=generator)
        bits[where] = special[torch.arange(where.numel()) % len(special)]
    return bits.to(BITS[dtype]).view(dtype).reshape(shape)


def make_perms(w, axes, generator, device):
    return [(a, torch.randperm(w.shape[a], generator=generator).to(device)) for a in axes]


def expected_bits(w, pairs):
    """The index_select chain on the integer view of ``w`` (no float semantics at all)."""
    out = w.view(BITS[w.dtype])
    for axis, index in pairs:
        out = out.index_select(axis, index)
    return out.contiguous()


def assert_bits_equal(actual, w, pairs):
    assert actual.shape == w.shape and actual.dtype == w.dtype and actual.is_contiguous()
    assert torch.equal(actual.view(BITS[w.dtype]), expected_bits(w, pairs))


def run_cases(backend, cases, dtypes, generator, transform=None):
    device = device_for(backend)
    tensors, perms = [], []
    for k, (shape, axes) in enumerate(cases):
        dtype = dtypes[k % len(dtypes)]
        w = random_bits(shape, dtype, generator).to(device)
        if transform is not None:
            w = transform(w)
        tensors.append(w)
        perms.append(make_perms(w, axes, generator, device))
    before = [t.clone() for t in tensors]
    out = permute_tensors(tensors, perms, backend=backend)
    assert len(out) == len(tensors)
    for o, w, b, pairs in zip(out, tensors, before, perms):
        assert_bits_equal(o, w, pairs)
        assert torch.equal(w.view(BITS[w.dtype]), b.view(BITS[w.dtype]))  # inputs untouched
    return tensors, perms, out


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_index_select(backend, dtype, generator):
    run_cases(backend, CASES, [dtype], generator)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_mixed_dtypes_one_call(backend, generator):
    run_cases(backend, CASES, list(DTYPES), generator)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_non_contiguous_inputs(backend, generator):
    def views(w):
        if w.dim() >= 2:
            return w.transpose(0, -1).contiguous().transpose(0, -1)  # same shape, transposed strides
        if w.dim() == 1:
            return torch.stack([w, w], dim=1)[:, 0]  # every other element of a bigger tensor
        return w

    tensors, _, _ = run_cases(backend, CASES, list(DTYPES), generator, transform=views)
    assert any(not t.is_contiguous() for t in tensors)
    device = device_for(backend)
    w = random_bits((6, 10, 4), torch.float32, generator).to(device)[:, ::3, 1:]  # steps and offsets
    pairs = make_perms(w, (0, 2), generator, device)
    assert_bits_equal(permute_tensors([w], [pairs], backend=backend)[0], w, pairs)


@pytest.mark.parametrize("backend", fast_backends())
def test_fast_equals_reference_backend(backend, generator):
    """Nasty float values (conftest) and the reference backend itself, compared as raw bits."""
    device = device_for(backend)
    tensors, perms = [], []
    for k, (shape, axes) in enumerate(CASES[:17]):
        dtype = DTYPES[k % 3]
        w = nasty(("mixed", "zeros", "denormal", "huge")[k % 4], shape, dtype, generator).to(device)
        tensors.append(w)
        perms.append(make_perms(w, axes, generator, device))
    fast = permute_tensors(tensors, perms, backend=backend)
    ref = permute_tensors(tensors, perms, backend="torch")
    for f, r in zip(fast, ref):
        assert torch.equal(f.view(BITS[f.dtype]), r.view(BITS[r.dtype]))


def test_cpu_big_shapes(generator):
    """Long rows (split into slices), many threads, and a ResNet-sized conv, on the C++ kernels."""
    if kernels.load("cpu")[0] is None:
        pytest.skip("cpu backend unavailable")
    threads = torch.get_num_threads()
    try:
        for n in sorted({1, max(2, threads)}):
            torch.set_num_threads(n)
            run_cases("cpu", BIG_CASES, list(DTYPES), generator)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.skipif(not ON_GPU, reason="sizes for a GPU")
def test_triton_big_shapes(generator):
    run_cases("triton", BIG_CASES, list(DTYPES), generator)


def test_shared_indices_and_reference_semantics(generator):
    """One index object shared by many tensors (a conv and its BN vectors), pairs given in any order."""
    p, q = torch.randperm(8, generator=generator), torch.randperm(4, generator=generator)
    conv, bn, lin = torch.randn(8, 4, 3, 3), torch.randn(8), torch.randn(5, 8)
    out = permute_tensors([conv, bn, lin], [[(1, q), (0, p)], [(0, p)], [(-1, p)]], backend="torch")
    assert torch.equal(out[0], conv[p][:, q])
    assert torch.equal(out[1], bn[p])
    assert torch.equal(out[2], lin[:, p])
    assert permute_tensors([], [], backend="torch") == []
    copy = permute_tensors([conv], [[]], backend="torch")[0]
    assert torch.equal(copy, conv) and copy.data_ptr() != conv.data_ptr()


@pytest.mark.parametrize("backend", fast_backends())
def test_kernel_writes_every_output_element(backend, generator):
    """The kernel entry point itself, on poisoned outputs, with identity (None) indices."""
    module = kernels.load("cpu")[0] if backend == "cpu" else kernels.load("triton_permute")[0]
    assert module is not None
    device = device_for(backend)
    srcs, outs, geoms, idx0, idx1, wants = [], [], [], [], [], []
    for k, (shape, axes) in enumerate(CASES):
        w = random_bits(shape, DTYPES[k % 3], generator).to(device)
        pairs = sorted(((a % w.dim(), p) for a, p in make_perms(w, axes, generator, device)), key=lambda p: p[0])
        geom, p0, p1 = _geometry(tuple(w.shape), pairs)
        srcs.append(w)
        outs.append(torch.full(w.shape, -1, dtype=BITS[w.dtype], device=device).view(w.dtype))
        geoms.append(geom)
        idx0.append(p0)
        idx1.append(p1)
        wants.append(expected_bits(w, pairs))
    # a tensor whose both indices are None but whose axes are longer than 1: a plain copy
    w = random_bits((3, 4, 5), torch.float16, generator).to(device)
    srcs.append(w)
    outs.append(torch.full(w.shape, -1, dtype=torch.int16, device=device).view(w.dtype))
    geoms.append((1, 3, 4, 5, 1))
    idx0.append(None)
    idx1.append(None)
    wants.append(w.view(torch.int16).clone())
    module.permute(srcs, outs, geoms, idx0, idx1)
    for o, want in zip(outs, wants):
        assert torch.equal(o.view(want.dtype), want)


def test_cpu_binding_refuses_out_of_range_indices():
    if kernels.load("cpu")[0] is None:
        pytest.skip("cpu backend unavailable")
    from nlmerge import _C

    src = torch.randn(4, 3).numpy()
    out = torch.empty(4, 3).numpy()
    geom = torch.tensor([[1, 4, 1, 3, 1]]).numpy()
    with pytest.raises(ValueError, match=r"idx0\[0\].*outside"):
        _C.permute([src], [out], geom, [torch.tensor([0, 1, 2, 4]).numpy()], [None])
    with pytest.raises(ValueError, match=r"idx1\[0\].*outside"):
        _C.permute([src], [out], geom, [None], [torch.tensor([0, -1, 2]).numpy()])
    with pytest.raises(ValueError, match=r"srcs\[0\]"):
        _C.permute([src], [out], torch.tensor([[1, 4, 1, 2, 1]]).numpy(), [None], [None])


# ----------------------------------------------------------------------------- errors


def _bad_calls():
    w, v = torch.randn(4, 3), torch.randn(5)
    p4, p3, p5 = torch.randperm(4), torch.randperm(3), torch.randperm(5)
    dup = torch.tensor([0, 1, 1, 3])
    oob = torch.tensor([0, 1, 2, 4])
    neg = torch.tensor([0, -1, 2])
    return [
        ([w, v], [[(0, p4)], [(0, torch.zeros(5, dtype=torch.int64))]], ValueError, r"perms\[1\].*axis 0.*bijection"),
        ([w, v], [[(0, p4)], [(0, torch.tensor([4, 3, 2, 1, 1]))]], ValueError, r"perms\[1\].*axis 0.*bijection"),
        ([w], [[(0, dup)]], ValueError, r"perms\[0\].*axis 0.*not a permutation"),
        ([w], [[(0, oob)]], ValueError, r"perms\[0\].*axis 0.*not a permutation"),
        ([w], [[(1, neg)]], ValueError, r"perms\[0\].*axis 1.*not a permutation"),
        ([w], [[(0, p4), (1, torch.tensor([2, 2, 2]))]], ValueError, r"perms\[0\].*axis 1"),
        ([v, w], [[(0, p5)], [(1, p4)]], ValueError, r"perms\[1\].*axis 1.*shape"),
        ([w], [[(2, p4)]], ValueError, r"perms\[0\].*axis 2.*out of range"),
        ([w], [[(-3, p4)]], ValueError, r"perms\[0\].*axis -3.*out of range"),
        ([w], [[(0, p4), (-2, p4)]], ValueError, r"perms\[0\].*axis 0.*twice"),
        ([w], [[(0, p4), (1, p3), (0, p4)]], ValueError, r"perms\[0\].*at most two"),
        ([w], [[(0, p4.to(torch.int32))]], ValueError, r"perms\[0\].*axis 0.*int64"),
        ([w], [[(0, p4.view(2, 2))]], ValueError, r"perms\[0\].*axis 0.*shape"),
        ([w], [[(0, p4.to("meta"))]], ValueError, r"perms\[0\].*axis 0.*meta"),
        ([w, v.to("meta")], [[], []], ValueError, r"tensors\[1\].*meta"),
        ([w], [[(0.0, p4)]], TypeError, r"perms\[0\].*axis"),
        ([w], [[(0, [0, 1, 2, 3])]], TypeError, r"perms\[0\].*tensor"),
        ([w], [[0, p4]], TypeError, r"perms\[0\]"),
        ([w], [(0, p4)], TypeError, r"perms\[0\]"),
        ([w], [[], []], ValueError, r"perms has 2 entries for 1 tensors"),
        ([w.long()], [[]], ValueError, r"tensors\[0\]"),
        (w, [[]], TypeError, r"tensors"),
    ]


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("case", range(len(_bad_calls())))
def test_errors(backend, case):
    tensors, perms, error, pattern = _bad_calls()[case]
    device = device_for(backend)
    moved = tensors if isinstance(tensors, torch.Tensor) else [t if t.device.type == "meta" else t.to(device) for t in tensors]
    if device != "cpu":
        perms = [[(a, i.to(device) if isinstance(i, torch.Tensor) and i.device.type != "meta" else i) for a, i in spec]
                 if isinstance(spec, list) and all(isinstance(p, tuple) for p in spec) else spec for spec in perms]
    with pytest.raises(error, match=pattern):
        permute_tensors(moved, perms, backend=backend)


def test_shared_bad_index_named_at_first_use():
    bad = torch.tensor([0, 0, 1])
    with pytest.raises(ValueError, match=r"perms\[1\].*axis 1"):
        permute_tensors([torch.randn(3), torch.randn(2, 3), torch.randn(3)], [[], [(1, bad)], [(0, bad)]])


def test_reference_helpers():
    w = torch.randn(3, 4)
    _, plans = _normalize([w], [[(1, torch.randperm(4)), (0, torch.randperm(3))]])
    assert [a for a, _ in plans[0]] == [0, 1]
    assert _geometry((2, 3, 4, 5), [(1, None), (3, None)])[0] == (2, 3, 4, 5, 1)
    assert _geometry((2, 3, 4, 5), [(0, None)])[0] == (1, 1, 1, 2, 60)
    assert _geometry((2, 3, 4, 5), [(2, None)])[0] == (6, 1, 1, 4, 5)
    assert _geometry((2, 3), [])[0] == (1, 1, 1, 1, 6)
    r = permute_reference(w, [])
    assert torch.equal(r, w) and r.data_ptr() != w.data_ptr()
