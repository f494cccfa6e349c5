"""Counter-based random numbers: DARE's drops as a pure function of (seed, name, stream, index).

DESIGN.md ("Determinism"): the random draw for element ``i`` (flat, row-major index) of the tensor
called ``name`` under ``seed`` must not depend on the backend, the device, the number of processes
or how the tensor is cut into chunks. A stateful generator (``torch.rand``) cannot give that; a
counter-based one can: the draw is a keyed bijection of the element's index.

The generator is Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3",
SC 2011; the Random123 library), the generator of cuRAND and of Triton's ``tl.randint``:

- ``digest = sha256(b"nlmerge.random\\0" + seed as 8 bytes little-endian + name in UTF-8)``;
  the Philox key is ``(k0, k1)`` = the digest's first two little-endian 32-bit words, and ``h``
  its third word;
- element ``i`` of stream ``s`` (DARE: the expert's index) is lane ``i % 4`` of
  ``Philox4x32-10(counter=(j mod 2**32, j >> 32, s, h), key=(k0, k1))`` with ``j = i // 4``;
- its uniform is ``u = (lane >> 8) * 2**-24``: 24 random bits, exact in fp32, in [0, 1);
- ``keep_mask(..., density)`` keeps element i iff ``u < density``.

A Triton or CUDA kernel gets the same words from ``tl.philox(seed=(k1 << 32) | k0, c0, c1, c2,
c3)`` with that counter.

Backends (``backend=``, DESIGN.md "Backends"): the reference ``"torch"`` runs the rounds as plain
torch integer ops on int64 tensors (CPU or CUDA alike, never touching torch's global RNG): each
32-bit word lives in an int64, and the 32x32-bit products of Philox are split so that no
intermediate reaches 2**63 (torch's int64 arithmetic would overflow, and right shifts of negatives
are arithmetic). That costs about 50 ns per element on one CPU core. ``"cpu"`` (the default on CPU
tensors when the extension is built) is the C++ kernel ``csrc/cpu/random.cpp``, which writes the
draws, uniforms or keep flags directly, bit-identical to the reference (figures:
``benchmarks/bench_random.py``). There is no Triton kernel yet: on CUDA tensors every backend
runs the reference's torch code.
"""
import hashlib
import math

import torch

from nlmerge.ops._dispatch import resolve

_MASK32 = 0xFFFFFFFF
_MULTIPLIERS = (0xD2511F53, 0xCD9E8D57)  # Philox4x32's round multipliers
_KEY_BUMPS = (0x9E3779B9, 0xBB67AE85)  # Weyl increments of the key between rounds
ROUNDS = 10
UNIFORM_BITS = 24
_BLOCK = 1 << 14  # counters per block (4 elements each): temporaries stay in cache (fastest on CPUs)


def _mul_hi_lo(multiplier, x):
    """Exact ``(hi, lo)`` 32-bit halves of ``multiplier * x`` for both in [0, 2**32).

    With ``multiplier = m1 * 2**16 + m0``: ``a = x * m0`` and ``b = x * m1`` are < 2**48, so no
    intermediate reaches 2**63; ``x * multiplier = b * 2**16 + a``. Updates in place the
    temporaries it owns (fewer allocations: this is the hot loop).
    """
    a, b = x * (multiplier & 0xFFFF), x * (multiplier >> 16)
    hi = a >> 16
    hi += b
    hi >>= 16
    b &= 0xFFFF
    b <<= 16
    a += b
    a &= _MASK32
    return hi, a


def philox4x32(counter, key, rounds=ROUNDS):
    """The Philox4x32 bijection of a 128-bit counter under a 64-bit key.

    Parameters
    ----------
    counter : 4 int64 tensors (broadcastable) or Python ints, each word in [0, 2**32)
        Not modified.
    key : (int, int)
        Two 32-bit words.
    rounds : int
        10 is the standard (and Random123's known-answer tests).

    Returns
    -------
    tuple of 4 int64 tensors (or ints) with words in [0, 2**32).
    """
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(rounds):
        hi0, lo0 = _mul_hi_lo(_MULTIPLIERS[0], c0)
        hi1, lo1 = _mul_hi_lo(_MULTIPLIERS[1], c2)
        hi1 ^= c1  # hi0, hi1 are new: xor in place
        hi1 ^= k0
        hi0 ^= c3
        hi0 ^= k1
        c0, c1, c2, c3 = hi1, lo1, hi0, lo0
        k0, k1 = (k0 + _KEY_BUMPS[0]) & _MASK32, (k1 + _KEY_BUMPS[1]) & _MASK32
    return c0, c1, c2, c3


def stream_key(seed, name):
    """``(k0, k1, h)``: the Philox key and the counter's fourth word for ``(seed, name)``.

    ``seed`` is an int in [0, 2**64); ``name`` a string (the tensor's key).
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 1 << 64:
        raise ValueError(f"seed must be an integer in [0, 2**64), got {seed!r}")
    if not isinstance(name, str):
        raise TypeError(f"name must be a string (the tensor's name), got {type(name).__name__}")
    digest = hashlib.sha256(b"nlmerge.random\0" + seed.to_bytes(8, "little") + name.encode("utf-8")).digest()
    k0, k1, h = (int.from_bytes(digest[4 * w : 4 * w + 4], "little") for w in range(3))
    return k0, k1, h


def _check_range(count, offset, stream):
    for what, value, limit in (("count", count, 1 << 62), ("offset", offset, 1 << 62), ("stream", stream, 1 << 32)):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < limit:
            raise ValueError(f"{what} must be an integer in [0, {limit}), got {value!r}")
    if offset + count > 1 << 62:
        raise ValueError(f"offset + count = {offset + count} exceeds the 2**62 element indices")


def _fill_bits(out, key, offset, stream):
    """Write the 24-bit draws of elements ``offset .. offset + out.numel() - 1`` into int64 ``out``
    (the reference: torch integer ops, any device)."""
    k0, k1, h = key
    count = out.numel()
    first, end = offset // 4, (offset + count + 3) // 4  # counters covering the range
    for start in range(first, end, _BLOCK):
        stop = min(start + _BLOCK, end)
        j = torch.arange(start, stop, dtype=torch.int64, device=out.device)
        lanes = philox4x32((j & _MASK32, j >> 32, stream, h), (k0, k1))
        words = torch.stack(lanes, dim=1).reshape(-1)  # element 4j + lane
        lo, hi = max(offset, 4 * start), min(offset + count, 4 * stop)
        out[lo - offset : hi - offset] = words[lo - 4 * start : hi - 4 * start] >> (32 - UNIFORM_BITS)
    return out


_OUT_DTYPES = {"random_bits": torch.int64, "uniform": torch.float32, "keep_mask": torch.bool}


def _draws(op, seed, name, count, offset, stream, device, backend, threshold=None):
    """``op``'s flat output for elements ``offset .. offset + count - 1``: the 24-bit draws
    ("random_bits"), their uniforms ("uniform") or ``draw < threshold`` ("keep_mask"), from the
    backend that ``backend`` picks on ``device``."""
    _check_range(count, offset, stream)
    key = stream_key(seed, name)
    device = torch.device(device)
    chosen, kernels = resolve(backend, device, op)
    if chosen == "cpu":
        out = torch.empty(count, dtype=_OUT_DTYPES[op], device=device)
        kernels.random_draws(out, key, stream, offset, threshold)
        return out
    # "torch", and "triton" too: no Triton kernel yet, the reference's torch code runs on CUDA
    bits = _fill_bits(torch.empty(count, dtype=torch.int64, device=device), key, offset, stream)
    if op == "uniform":
        return bits.to(torch.float32) * 2.0**-UNIFORM_BITS
    return bits < threshold if op == "keep_mask" else bits


def random_bits(seed, name, count, *, offset=0, stream=0, device="cpu", backend=None):
    """The 24-bit integer draws of elements ``offset .. offset + count - 1`` of ``(seed, name, stream)``.

    Parameters
    ----------
    seed : int in [0, 2**64)
    name : str
        The tensor's name (its state-dict key).
    count, offset : int
        The element range, as flat row-major indices of the whole tensor: a chunk of a tensor
        draws exactly the values of the same elements drawn whole.
    stream : int in [0, 2**32)
        Independent streams of one (seed, name): DARE uses the expert's index.
    device : torch.device or str
    backend : None, "torch", "cpu" or "triton"
        None: the C++ kernel on CPU tensors when built, else the reference (module docstring).
        Every backend draws the same values.

    Returns
    -------
    Tensor
        int64 ``[count]``, values in [0, 2**24); the same on every device and backend.

    Raises
    ------
    ValueError
        ``seed``, ``count``, ``offset`` or ``stream`` out of range (the message names it), or an
        unknown ``backend``; RuntimeError for a backend that is asked for and not built.
    TypeError
        ``name`` is not a string.
    """
    return _draws("random_bits", seed, name, count, offset, stream, device, backend)


def uniform(seed, name, count, *, offset=0, stream=0, device="cpu", backend=None):
    """Uniform fp32 draws in [0, 1): ``random_bits(...) * 2**-24`` (exact). Arguments and errors as
    in :func:`random_bits`; returns float32 ``[count]``."""
    return _draws("uniform", seed, name, count, offset, stream, device, backend)


def keep_mask(seed, name, shape, density, *, offset=0, stream=0, device="cpu", backend=None):
    """DARE's keep mask: element i is kept iff its uniform ``u_i < density``.

    Compared as integers: ``bits_i < ceil(density * 2**24)``, so the keep probability is
    ``ceil(density * 2**24) / 2**24`` (``density`` to within 2**-24).

    Parameters
    ----------
    seed, name, offset, stream, device, backend
        As in :func:`random_bits` (``offset``: flat index of this mask's first element in the
        whole tensor).
    shape : int or tuple of int
        Shape of the mask (the tensor, or a chunk of it).
    density : float in [0, 1]
        Probability of keeping an element.

    Returns
    -------
    Tensor
        bool, of ``shape``.

    Raises
    ------
    ValueError
        ``density`` outside [0, 1] (or NaN), and the errors of :func:`random_bits`.
    """
    shape = torch.Size([shape] if isinstance(shape, int) else shape)
    threshold = keep_threshold(density)
    return _draws("keep_mask", seed, name, shape.numel(), offset, stream, device, backend, threshold).reshape(shape)


def keep_threshold(density):
    """The integer threshold of :func:`keep_mask`: ``ceil(density * 2**24)``, in [0, 2**24]; an
    element is kept iff its 24-bit draw is below it. Raises ValueError for a ``density`` outside
    [0, 1] (or NaN)."""
    density = float(density)
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"density must be in [0, 1] (the probability of keeping an element), got {density}")
    return math.ceil(density * 2.0**UNIFORM_BITS)
