"""Triton backend of the batched permutation gathers (CONTRACT.md, "Permutation gathers").

``permute`` launches ONE kernel for all tensors of a call, whatever their dtypes:

- a descriptor table, int64 ``[n, 10]`` on the device, holds per tensor the raw addresses
  (``data_ptr()``) of its source, output and two index vectors, its geometry
  ``A0, mid, A1, inner`` in words, its size in words and its first program; the kernel turns the
  addresses back into pointers with ``.to(tl.pointer_type(...))`` (int64 -> pointer; this works
  in Triton's interpreter too, where the addresses are host addresses);
- a program map, int32 ``[programs]``, gives each program its tensor; program ``pid`` copies
  output words ``[(pid - first) * BLOCK, ... + BLOCK)`` of that tensor.

Values move as raw words: int32 when every tensor of the call has 4-byte elements, else int16
(a 4-byte element is two int16 words, so fp32 and 16-bit tensors share one launch). Each output
word's flat offset is decoded into ``(o, i, m, j, u)`` of the ``[outer, A0, mid, A1, inner]``
view, the source offset is ``((o * A0 + p0[i]) * mid + m) * A1 + p1[j]) * inner + u``; all offsets
are int64. Exact for every dtype, NaN payloads included (no float arithmetic at all).
A missing index (identity) points at a shared ``arange`` on the device.
"""
import contextlib

import torch
import triton
import triton.language as tl

available = True
load_error = None

_BLOCK = 1024  # output words per program
_NUM_WARPS = 4
_NDESC = 10  # int64 fields per tensor in the descriptor table


@triton.jit
def _permute_kernel(
    desc_ptr,  # int64 [n, NDESC]: src, dst, idx0, idx1 (addresses), A0, mid, A1, inner, words, first program
    prog_ptr,  # int32 [programs]: the tensor of each program
    NDESC: tl.constexpr,
    WORD32: tl.constexpr,  # words are int32 (every tensor 4-byte), else int16
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    t = tl.load(prog_ptr + pid).to(tl.int64)
    row = desc_ptr + t * NDESC
    if WORD32:
        src = tl.load(row + 0).to(tl.pointer_type(tl.int32))
        dst = tl.load(row + 1).to(tl.pointer_type(tl.int32))
    else:
        src = tl.load(row + 0).to(tl.pointer_type(tl.int16))
        dst = tl.load(row + 1).to(tl.pointer_type(tl.int16))
    idx0 = tl.load(row + 2).to(tl.pointer_type(tl.int64))
    idx1 = tl.load(row + 3).to(tl.pointer_type(tl.int64))
    a0 = tl.load(row + 4)
    mid = tl.load(row + 5)
    a1 = tl.load(row + 6)
    inner = tl.load(row + 7)
    words = tl.load(row + 8)
    first = tl.load(row + 9)
    start = (pid - first).to(tl.int64) * BLOCK
    e = start + tl.arange(0, BLOCK).to(tl.int64)
    mask = e < words
    u = e % inner
    r = e // inner
    j = r % a1
    r = r // a1
    m = r % mid
    r = r // mid
    i = r % a0
    o = r // a0
    pi = tl.load(idx0 + i, mask=mask, other=0)
    pj = tl.load(idx1 + j, mask=mask, other=0)
    s = (((o * a0 + pi) * mid + m) * a1 + pj) * inner + u
    x = tl.load(src + s, mask=mask, other=0)
    tl.store(dst + e, x, mask=mask)


def _device(t):
    """Run launches on the tensor's own GPU."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def permute(srcs, outs, geometry, idx0, idx1):
    """Batched permutation gathers in one launch (see the module docstring and CONTRACT.md).

    ``outs[k][o, i, m, j, u] = srcs[k][o, idx0[k][i], m, idx1[k][j], u]`` over the contiguous view
    ``[outer, A0, mid, A1, inner] = geometry[k]``; ``idx0[k]`` / ``idx1[k]``: int64 tensors of
    length A0 / A1 on the tensors' device, or None (identity). srcs and outs contiguous, one device.
    """
    live = [k for k, s in enumerate(srcs) if s.numel() > 0]
    if not live:
        return
    device = srcs[live[0]].device
    word32 = all(srcs[k].element_size() == 4 for k in live)
    word_bytes = 4 if word32 else 2
    identity = {}

    def index(p, n):
        if p is not None:
            return p
        n = max(int(n), 1)
        if n not in identity:
            identity[n] = torch.arange(n, dtype=torch.int64, device=device)
        return identity[n]

    rows, blocks = [], []
    first = 0
    keep = []  # every tensor whose address is in the table stays alive until the launch returns
    for k in live:
        src, out = srcs[k], outs[k]
        outer, a0, mid, a1, inner = (int(v) for v in geometry[k])
        per = src.element_size() // word_bytes  # words per element
        p0, p1 = index(idx0[k], a0), index(idx1[k], a1)
        keep += [p0, p1]
        nwords = src.numel() * per
        nblocks = triton.cdiv(nwords, _BLOCK)
        rows.append([src.data_ptr(), out.data_ptr(), p0.data_ptr(), p1.data_ptr(), a0, mid, a1, inner * per, nwords, first])
        blocks.append(nblocks)
        first += nblocks
    desc = torch.tensor(rows, dtype=torch.int64).to(device)
    prog = torch.repeat_interleave(torch.arange(len(rows), dtype=torch.int32), torch.tensor(blocks)).to(device)
    with _device(srcs[live[0]]):
        _permute_kernel[(first,)](desc, prog, NDESC=_NDESC, WORD32=word32, BLOCK=_BLOCK, num_warps=_NUM_WARPS)
    del keep
