"""Triton kernels of the streaming statistics (``nlmerge.ops.stats``, backend "triton").

Two launchers, both on a batch ``x`` [M, C] whose last dim is contiguous (any row stride):

- ``column_sums(x, shift=None, squares=False)``: float64 ``sum_m (x[m] - shift)`` per column (and
  ``sum_m (x[m] - shift)^2`` with ``squares``), computed in float64 from the loaded values. Without
  a shift it is the plain column sum: the ops layer takes ``shift = fp32(sum / M)`` from it, and a
  non-finite sum flags a non-finite input (float64 sums of finite 16/32-bit floats cannot overflow).
- ``centred_gram(x, y, shift_x, shift_y)``: float64 [C, D] ``sum_m (x[m] - shift_x)^T (y[m] - shift_y)``,
  plus the column sums and sums of squares of both centred inputs, from the same tiles.
  Each program owns one [BM, BN] output tile; it loads x^T and y tiles, centres them in fp32 in
  registers (no centred copy exists in memory) and multiplies them with
  ``tl.dot(..., input_precision="ieee")`` (not TF32) into an fp32 accumulator, which is folded into a
  float64 accumulator every ``CHUNK`` rows, so fp32 sums never run over more than ``CHUNK`` products.
  When there are few output tiles the rows are split over ``S`` programs per tile (chunks
  ``s, s + S, ...``); their float64 partials are summed by torch in a fixed order (deterministic).

bf16 is loaded as int16 bits (``bits << 16`` is the fp32 value), as the interpreter requires.
Row offsets are int64 (``M * stride`` may exceed 2**31).
"""
import torch
import triton
import triton.language as tl

available = True
load_error = None

_F32, _F16, _BF16 = 0, 1, 2
_KIND = {torch.float32: _F32, torch.float16: _F16, torch.bfloat16: _BF16}
CHUNK = 1024  # rows per fp32 accumulation in the Gram before folding into float64


@triton.jit
def _load_f32(ptrs, mask, KIND: tl.constexpr):
    """Load a tile as fp32 (bf16 arrives as int16 bits); 0 where masked."""
    if KIND == 2:
        bits = tl.load(ptrs, mask=mask, other=0)
        v = (bits.to(tl.int32) << 16).to(tl.float32, bitcast=True)
    else:
        v = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    return v


@triton.jit
def _colsum_kernel(
    x_ptr,  # [M, C] (row stride stride_x, unit column stride)
    shift_ptr,  # fp32 [C] or dummy
    out_ptr,  # float64 [2, S, C]: sums, sums of squares
    M,
    C,
    stride_x,
    S,
    KIND: tl.constexpr,
    SHIFTED: tl.constexpr,
    SQUARES: tl.constexpr,
    BR: tl.constexpr,
    BC: tl.constexpr,
):
    pc = tl.program_id(0)
    s = tl.program_id(1)
    cols = pc * BC + tl.arange(0, BC)
    cmask = cols < C
    if SHIFTED:
        sh = tl.load(shift_ptr + cols, mask=cmask, other=0.0).to(tl.float64)
    acc = tl.zeros([BC], dtype=tl.float64)
    acc2 = tl.zeros([BC], dtype=tl.float64)
    for r0 in range(s * BR, M, S * BR):
        rows = r0 + tl.arange(0, BR)
        mask = (rows < M)[:, None] & cmask[None, :]
        v = _load_f32(x_ptr + rows.to(tl.int64)[:, None] * stride_x + cols[None, :], mask, KIND).to(tl.float64)
        if SHIFTED:
            v = tl.where(mask, v - sh[None, :], 0.0)
        acc += tl.sum(v, axis=0)
        if SQUARES:
            acc2 += tl.sum(v * v, axis=0)
    tl.store(out_ptr + s * C + cols, acc, mask=cmask)
    if SQUARES:
        tl.store(out_ptr + (S + s) * C + cols, acc2, mask=cmask)


@triton.jit
def _gram_kernel(
    x_ptr,  # [M, C]
    y_ptr,  # [M, D]
    shx_ptr,  # fp32 [C]
    shy_ptr,  # fp32 [D]
    out_ptr,  # float64 [S, C, D]
    sx_ptr,  # float64 [S, 2, C]: sums and sums of squares of x - shift_x
    sy_ptr,  # float64 [S, 2, D]: the same for y
    M,
    C,
    D,
    stride_x,
    stride_y,
    S,
    n_chunks,
    XKIND: tl.constexpr,
    YKIND: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    CHUNK_ROWS: tl.constexpr,
):
    pi = tl.program_id(0)
    pj = tl.program_id(1)
    s = tl.program_id(2)
    ci = pi * BM + tl.arange(0, BM)
    cj = pj * BN + tl.arange(0, BN)
    imask = ci < C
    jmask = cj < D
    shx = tl.load(shx_ptr + ci, mask=imask, other=0.0)
    shy = tl.load(shy_ptr + cj, mask=jmask, other=0.0)
    acc64 = tl.zeros([BM, BN], dtype=tl.float64)
    sx64 = tl.zeros([BM], dtype=tl.float64)
    sxx64 = tl.zeros([BM], dtype=tl.float64)
    sy64 = tl.zeros([BN], dtype=tl.float64)
    syy64 = tl.zeros([BN], dtype=tl.float64)
    for c in range(s, n_chunks, S):
        acc = tl.zeros([BM, BN], dtype=tl.float32)
        ax = tl.zeros([BM], dtype=tl.float32)
        axx = tl.zeros([BM], dtype=tl.float32)
        ay = tl.zeros([BN], dtype=tl.float32)
        ayy = tl.zeros([BN], dtype=tl.float32)
        for k0 in range(0, CHUNK_ROWS, BK):
            rows = c * CHUNK_ROWS + k0 + tl.arange(0, BK)
            rmask = rows < M
            roff = rows.to(tl.int64)
            xm = imask[:, None] & rmask[None, :]
            xt = _load_f32(x_ptr + roff[None, :] * stride_x + ci[:, None], xm, XKIND)  # [BM, BK] = x^T
            xt = tl.where(xm, xt - shx[:, None], 0.0)
            ym = rmask[:, None] & jmask[None, :]
            yt = _load_f32(y_ptr + roff[:, None] * stride_y + cj[None, :], ym, YKIND)  # [BK, BN]
            yt = tl.where(ym, yt - shy[None, :], 0.0)
            acc = tl.dot(xt, yt, acc, input_precision="ieee")
            # the column moments ride along (a few % of the dot's work; stored by one program
            # per tile row / column), saving two more passes over x and y
            ax += tl.sum(xt, axis=1)
            axx += tl.sum(xt * xt, axis=1)
            ay += tl.sum(yt, axis=0)
            ayy += tl.sum(yt * yt, axis=0)
        acc64 += acc.to(tl.float64)
        sx64 += ax.to(tl.float64)
        sxx64 += axx.to(tl.float64)
        sy64 += ay.to(tl.float64)
        syy64 += ayy.to(tl.float64)
    s64 = s.to(tl.int64)
    optr = out_ptr + s64 * C * D + ci.to(tl.int64)[:, None] * D + cj[None, :]
    tl.store(optr, acc64, mask=imask[:, None] & jmask[None, :])
    xmask = imask & ((ci * 0 + pj) == 0)  # a block-shaped condition (the interpreter needs one)
    tl.store(sx_ptr + s64 * 2 * C + ci, sx64, mask=xmask)
    tl.store(sx_ptr + (s64 * 2 + 1) * C + ci, sxx64, mask=xmask)
    ymask = jmask & ((cj * 0 + pi) == 0)
    tl.store(sy_ptr + s64 * 2 * D + cj, sy64, mask=ymask)
    tl.store(sy_ptr + (s64 * 2 + 1) * D + cj, syy64, mask=ymask)


def _interpreting(t):
    return t.device.type != "cuda"


def _target_programs(t):
    if _interpreting(t):
        return 8  # the interpreter runs programs one by one: keep grids tiny
    return 4 * torch.cuda.get_device_properties(t.device).multi_processor_count


def _bits(t):
    """The tensor to hand to a kernel (bf16 viewed as int16) and its dtype code."""
    kind = _KIND[t.dtype]
    return (t.view(torch.int16) if kind == _BF16 else t), kind


def column_sums(x, shift=None, squares=False):
    """Float64 column sums of ``x - shift`` (and of its squares).

    Parameters
    ----------
    x : Tensor [M, C]
        fp32, fp16 or bf16, unit stride along C.
    shift : Tensor [C] fp32, optional
        Subtracted (in float64) before summing; None sums the raw values.
    squares : bool
        Also return the sums of squares.

    Returns
    -------
    Tensor [C] float64, or a pair of them with ``squares``.
    """
    M, C = x.shape
    assert x.stride(1) == 1 or C == 1
    BR, BC = 32, (64 if _interpreting(x) else 128)
    col_blocks = triton.cdiv(C, BC)
    S = max(1, min(triton.cdiv(M, BR), _target_programs(x) // col_blocks))
    out = torch.empty((2 if squares else 1, S, C), dtype=torch.float64, device=x.device)
    xb, kind = _bits(x)
    sh = shift if shift is not None else out  # dummy pointer when unshifted
    _colsum_kernel[(col_blocks, S)](
        xb, sh, out, M, C, x.stride(0), S,
        KIND=kind, SHIFTED=shift is not None, SQUARES=squares, BR=BR, BC=BC, num_warps=4, enable_fp_fusion=True,
    )
    total = out.sum(dim=1)
    return (total[0], total[1]) if squares else total[0]


def centred_gram(x, y, shift_x, shift_y, chunk=None):
    """Float64 ``(x - shift_x)^T (y - shift_y)`` with fp32 IEEE tile products, and the column moments.

    Parameters
    ----------
    x : Tensor [M, C], y : Tensor [M, D]
        fp32, fp16 or bf16 (may differ), unit stride along the last dim; ``y`` may be ``x``.
    shift_x : Tensor [C] fp32, shift_y : Tensor [D] fp32
    chunk : int, optional
        Rows per fp32 accumulation (a multiple of 32); default ``CHUNK``.

    Returns
    -------
    (gram, sx, sxx, sy, syy)
        ``gram`` float64 [C, D]; float64 sums and sums of squares of ``x - shift_x`` [C] and of
        ``y - shift_y`` [D] (fp32 within a chunk, like the Gram).
    """
    M, C = x.shape
    D = y.shape[1]
    chunk = CHUNK if chunk is None else chunk
    if _interpreting(x):
        BM = BN = BK = 32
    else:
        BM, BN, BK = 64, 64, 32
    assert chunk % BK == 0
    tiles = triton.cdiv(C, BM) * triton.cdiv(D, BN)
    n_chunks = triton.cdiv(M, chunk)
    S = max(1, min(n_chunks, _target_programs(x) // tiles))
    out = torch.empty((S, C, D), dtype=torch.float64, device=x.device)
    mx = torch.empty((S, 2, C), dtype=torch.float64, device=x.device)
    my = torch.empty((S, 2, D), dtype=torch.float64, device=x.device)
    xb, xkind = _bits(x)
    yb, ykind = _bits(y)
    _gram_kernel[(triton.cdiv(C, BM), triton.cdiv(D, BN), S)](
        xb, yb, shift_x.contiguous(), shift_y.contiguous(), out, mx, my, M, C, D, x.stride(0), y.stride(0), S, n_chunks,
        XKIND=xkind, YKIND=ykind, BM=BM, BN=BN, BK=BK, CHUNK_ROWS=chunk, num_warps=4, enable_fp_fusion=True,
    )
    gram = out[0] if S == 1 else out.sum(dim=0)
    mx, my = mx.sum(dim=0), my.sum(dim=0)
    return gram, mx[0], mx[1], my[0], my[1]
