"""Results that do not fit their dtype are errors naming the key, never a silent Inf; out_dtype
asks for a wider one (DESIGN.md, "Caller's data" and "Numbers"). Every op and merge, every backend
(Triton in its interpreter on tiny shapes)."""
import pytest
import torch
from conftest import fast_backends

from nlmerge import merge, ops
from nlmerge.ops._checks import NonFiniteResultError

F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32
BACKENDS = ["torch", *fast_backends()]
FITS_F32 = r"does not fit torch\.{} .*pass out_dtype=torch\.float32"
NOTHING_FITS = r"does not fit torch\.float32 .*overflows float32 as well"
BF16_OVER = 3.4e38  # finite in fp32, beyond bf16's largest value (3.39e38) once rounded: Inf


def full(value, dtype, n=5):
    return torch.full((n,), value, dtype=dtype)


# --------------------------------------------------------------------------- ops


@pytest.mark.parametrize("backend", BACKENDS)
def test_task_arithmetic_op_overflow(backend):
    tv = full(10000.0, F16).expand(8, 5).contiguous()  # 8 experts of 10000 in fp16
    base = full(0.0, F16)
    with pytest.raises(NonFiniteResultError, match=FITS_F32.format("float16")) as err:
        ops.task_arithmetic(tv, base=base, backend=backend)
    assert (err.value.dtype, err.value.fits) == (F16, F32)
    assert isinstance(err.value, ops.NonFiniteError) and isinstance(err.value, ValueError)
    got = ops.task_arithmetic(tv, base=base, out_dtype=F32, backend=backend)
    assert got.dtype == F32 and torch.equal(got, full(80000.0, F32))
    # fp32 itself overflows: no dtype fits
    big = full(3e38, F32).expand(2, 5).contiguous()
    with pytest.raises(NonFiniteResultError, match=NOTHING_FITS) as err:
        ops.task_arithmetic(big, base=full(0.0, F32), backend=backend)
    assert err.value.fits is None
    # bf16: the fp32 result fits, its rounding to bf16 does not
    with pytest.raises(NonFiniteResultError, match=FITS_F32.format("bfloat16")):
        ops.task_arithmetic(full(BF16_OVER, F32)[None], base=full(0.0, BF16), backend=backend)
    # without base the result is in the task vectors' dtype, and out_dtype may narrow it
    with pytest.raises(NonFiniteResultError, match=FITS_F32.format("float16")):
        ops.task_arithmetic(full(70000.0, F32)[None], out_dtype=F16, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("zero_sign", ["majority", "positive"])
def test_ties_op_overflow(backend, zero_sign):
    tv = full(60000.0, F16).expand(2, 5).contiguous()
    kwargs = dict(disjoint="sum", base=full(0.0, F16), zero_sign=zero_sign, backend=backend)
    with pytest.raises(NonFiniteResultError, match=FITS_F32.format("float16")):
        ops.ties_merge(tv, [0.0, 0.0], **kwargs)
    assert torch.equal(ops.ties_merge(tv, [0.0, 0.0], out_dtype=F32, **kwargs), full(120000.0, F32))
    # the mean fits: no error
    assert torch.equal(ops.ties_merge(tv, [0.0, 0.0], **{**kwargs, "disjoint": "mean"}), full(60000.0, F16))


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_pass_reports_or_raises(backend):
    tv = full(60000.0, F16).expand(2, 5).contiguous()
    kwargs = dict(fill_sign=0, disjoint="sum", base=full(0.0, F16), backend=backend)
    with pytest.raises(NonFiniteResultError):
        ops.ties_merge_pass(tv, [0.0, 0.0], **kwargs)
    unchecked = ops.ties_merge_pass(tv, [0.0, 0.0], check_result=False, **kwargs)
    assert unchecked.overflow and bool(torch.isinf(unchecked.merged).all())
    assert not ops.ties_merge_pass(tv, [0.0, 0.0], check_result=False, **{**kwargs, "disjoint": "max"}).overflow


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_overflow_judged_on_the_final_pass(backend):
    """Element 0 elects no sign (mass 32000 - 32000 - 32000 + 32000 = 0): the first pass (fill 0)
    merges the negative entries, -16000 - 64000, which overflows fp16; the majority sign (+, from
    elements 1..4) merges the positive ones, -16000 + 64000, which fit: no error. Negated, the
    majority is - and the result overflows: an error."""
    tv = torch.zeros(4, 5, dtype=F16)
    tv[:, 0] = torch.tensor([32000.0, -32000.0, -32000.0, 32000.0])
    tv[0, 1:] = 1
    base = torch.tensor([-16000.0, 0, 0, 0, 0], dtype=F16)
    got = ops.ties_merge(tv, [0.0] * 4, disjoint="sum", base=base, backend=backend)
    assert torch.equal(got, torch.tensor([48000.0, 1, 1, 1, 1], dtype=F16))
    with pytest.raises(NonFiniteResultError):
        ops.ties_merge(-tv, [0.0] * 4, disjoint="sum", base=base, backend=backend)
    # global scope: key "a" runs first (majority so far: none) and overflows; "b" makes it +
    base_sd = {"a": base[:1].clone(), "b": torch.zeros(4, dtype=F16)}
    experts = [{"a": base[:1] + tv[t, :1], "b": tv[t, 1:].clone()} for t in range(4)]
    got = merge.ties(base_sd, experts, keep=1.0, disjoint="sum", backend=backend)
    assert torch.equal(got["a"], torch.tensor([48000.0], dtype=F16))


@pytest.mark.parametrize("backend", BACKENDS)
def test_tall_ops_overflow(backend):
    tv = full(40000.0, F16).expand(2, 5).contiguous()
    mtl = ops.task_arithmetic(tv, out_dtype=F32, backend=backend)  # 80000
    base = full(0.0, F16)
    with pytest.raises(NonFiniteResultError, match=FITS_F32.format("float16")):
        ops.consensus_merge(tv, mtl, 0.5, k=1, base=base, alpha=1.0, backend=backend)
    got = ops.consensus_merge(tv, mtl, 0.5, k=1, base=base, alpha=1.0, out_dtype=F32, backend=backend)
    assert torch.equal(got, full(80000.0, F32))
    packed = ops.tall_masks(tv, mtl, 0.5, backend=backend)
    assert torch.equal(ops.unpack_masks(packed, 5), torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(NonFiniteResultError, match=FITS_F32.format("float16")):
        ops.apply_mask(packed[0], mtl, base=base, backend=backend)
    assert torch.equal(ops.apply_mask(packed[0], mtl, base=base, out_dtype=F32, backend=backend), full(80000.0, F32))
    with pytest.raises(NonFiniteResultError, match=FITS_F32.format("bfloat16")):
        ops.apply_mask(packed[0], full(BF16_OVER, F32), base=full(0.0, BF16), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nonfinite_input_wins_over_overflow(backend):
    """A NaN input is named as such (NonFiniteError on the input), even where another element of the
    result overflows."""
    tv = full(40000.0, F16).expand(2, 5).contiguous().clone()
    tv[1, 3] = float("nan")
    for call in (
        lambda: ops.task_arithmetic(tv, base=full(0.0, F16), backend=backend),
        lambda: ops.ties_merge(tv, [0.0, 0.0], disjoint="sum", base=full(0.0, F16), backend=backend),
        lambda: ops.consensus_merge(tv, full(80000.0, F32), 0.5, k=1, base=full(0.0, F16), backend=backend),
    ):
        with pytest.raises(ops.NonFiniteError, match=r"task_vectors\[1\] contains NaN") as err:
            call()
        assert not isinstance(err.value, NonFiniteResultError)


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_dtype_refused(backend):
    tv = torch.ones(2, 3)
    for bad in (torch.float64, torch.int32, "float16"):
        with pytest.raises(ValueError, match="out_dtype must be None, torch.float32, torch.float16 or torch.bfloat16"):
            ops.task_arithmetic(tv, out_dtype=bad, backend=backend)
        with pytest.raises(ValueError, match="out_dtype must be"):
            ops.apply_mask(torch.zeros(1, dtype=torch.uint8), tv[0], out_dtype=bad, backend=backend)


# --------------------------------------------------------------------------- merges

MERGE_BACKENDS = [None, *BACKENDS]


def overflowing(dtype=F16, value=40000.0, num=2):
    """Base 0 and ``num`` experts of ``value``: sums of task vectors leave fp16."""
    base = {"w": full(0.0, dtype), "b": full(1.0, dtype), "step": torch.tensor(3)}
    experts = [{"w": full(value, dtype), "b": full(1.0, dtype), "step": torch.tensor(9)} for _ in range(num)]
    return base, experts


OVERFLOWS = {  # name: (call, inputs, the fp32 result of key "w")
    "task_arithmetic": (lambda b, e, **kw: merge.task_arithmetic(b, e, lam=1.0, **kw), (10000.0, 8), 80000.0),
    "ties_sum_global": (lambda b, e, **kw: merge.ties(b, e, keep=1.0, disjoint="sum", **kw), (60000.0, 2), 120000.0),
    "ties_sum_tensor": (
        lambda b, e, **kw: merge.ties(b, e, keep=1.0, disjoint="sum", scope="tensor", **kw), (60000.0, 2), 120000.0
    ),
    "ties_mergekit_lam": (lambda b, e, **kw: merge.ties(b, e, lam=2.0, convention="mergekit", **kw), (60000.0, 2), 120000.0),
    "consensus": (lambda b, e, **kw: merge.consensus(b, e, k=1, alpha=1.0, **kw), (40000.0, 2), 80000.0),
    "tall_task_model": (lambda b, e, **kw: merge.tall(b, e, **kw).task_state_dict(0), (40000.0, 2), 80000.0),
}


@pytest.mark.parametrize("backend", MERGE_BACKENDS)
@pytest.mark.parametrize("name", list(OVERFLOWS))
def test_merge_overflow_names_key(name, backend):
    call, (value, num), exact = OVERFLOWS[name]
    base, experts = overflowing(value=value, num=num)
    before = [{k: v.clone() for k, v in sd.items()} for sd in (base, *experts)]
    with pytest.raises(ValueError, match=r"key 'w': the merged result does not fit torch\.float16 .*out_dtype=torch\.float32"):
        call(base, experts, backend=backend)
    for sd, copy in zip((base, *experts), before):  # nothing changed in the caller's dicts
        assert all(torch.equal(sd[k], copy[k]) for k in sd)
    got = call(base, experts, out_dtype=F32, backend=backend)
    assert got["w"].dtype == F32 and torch.equal(got["w"], full(exact, F32))
    assert got["b"].dtype == F32 and torch.equal(got["b"], full(1.0, F32))
    assert torch.equal(got["step"], torch.tensor(3))  # integer buffers: copied


@pytest.mark.parametrize("backend", MERGE_BACKENDS)
def test_average_and_task_vectors_overflow(backend):
    models = [{"w": full(60000.0, F16)}, {"w": full(-60000.0, F16)}]
    with pytest.raises(ValueError, match=r"key 'w': .*does not fit torch\.float16"):
        merge.average(models, [1.5, -0.5], backend=backend)  # 90000 + 30000
    got = merge.average(models, [1.5, -0.5], out_dtype=F32, backend=backend)
    assert torch.equal(got["w"], full(120000.0, F32))
    with pytest.raises(ValueError, match=r"key 'w', task vector of expert 0: .*does not fit torch\.float16"):
        merge.task_vectors(models[1], models[:1])  # 60000 - (-60000)
    assert torch.equal(merge.task_vectors(models[1], models[:1], out_dtype=F32)[0]["w"], full(120000.0, F32))


@pytest.mark.parametrize("backend", MERGE_BACKENDS)
def test_fp32_overflow_has_no_wider_dtype(backend):
    base, experts = overflowing(F32, 3e38)
    with pytest.raises(ValueError, match=r"key 'w': .*overflows float32 as well"):
        merge.task_arithmetic(base, experts, backend=backend)


def test_tall_out_dtype_defaults():
    base, experts = overflowing()
    tm = merge.tall(base, experts, out_dtype=F32)
    assert tm.out_dtype == F32
    assert torch.equal(tm.task_state_dict(1)["w"], full(80000.0, F32))
    with pytest.raises(ValueError, match=r"key 'w'"):
        tm.task_state_dict(1, out_dtype=F16)
    with pytest.raises(ValueError, match="out_dtype must be"):
        merge.tall(base, experts, out_dtype=torch.float64)


def test_running_stats_out_dtype_overflow():
    base = {"bn.running_var": full(1e6, F32)}
    experts = [{"bn.running_var": full(1e6, F32)}, {"bn.running_var": full(3e6, F32)}]
    with pytest.raises(ValueError, match=r"key 'bn.running_var': .*does not fit torch\.float16"):
        merge.task_arithmetic(base, experts, out_dtype=F16)
    assert torch.equal(merge.task_arithmetic(base, experts)["bn.running_var"], full(2e6, F32))
