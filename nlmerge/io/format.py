"""The safetensors file format, read and written without trusting a byte before it is checked.

A safetensors file is: an 8-byte little-endian header length ``n``; ``n`` bytes of JSON
``{"__metadata__": {str: str}, key: {"dtype": "F32", "shape": [..], "data_offsets": [b, e]}, ...}``
padded with spaces so that ``8 + n`` is a multiple of 8; then the data buffer, where each tensor
holds the bytes ``[b, e)`` (offsets relative to the buffer), little-endian, C order. The offsets
tile the buffer exactly (no gaps, no overlap, nothing after the last tensor).
"""
import json
import os
import struct
from dataclasses import dataclass

import torch

# header lengths above this are refused before allocating (safetensors' own limit is 100 MB)
MAX_HEADER_BYTES = 100_000_000


class CheckpointError(ValueError):
    """A checkpoint on disk is missing, unreadable, corrupt or inconsistent; the message names
    the file (and the key where one is at fault)."""


def _torch_dtypes():
    """safetensors dtype names -> torch dtypes, for the dtypes this torch has."""
    names = {
        "BOOL": "bool", "U8": "uint8", "I8": "int8", "F8_E5M2": "float8_e5m2",
        "F8_E4M3": "float8_e4m3fn", "F8_E8M0": "float8_e8m0fnu", "I16": "int16",
        "U16": "uint16", "F16": "float16", "BF16": "bfloat16", "I32": "int32", "U32": "uint32",
        "F32": "float32", "F64": "float64", "I64": "int64", "U64": "uint64",
    }
    return {st: getattr(torch, tn) for st, tn in names.items() if hasattr(torch, tn)}


DTYPES = _torch_dtypes()
DTYPE_NAMES = {dt: name for name, dt in DTYPES.items()}

# safetensors' Dtype enum order (Rust `derive(Ord)`): `save_file` lays tensors out by this rank,
# highest first, then by name; following it makes our files byte-identical to `save_file`'s
_ENUM_ORDER = ("BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0",
               "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "C64", "F64", "I64", "U64")
_RANK = {name: i for i, name in enumerate(_ENUM_ORDER)}


def dtype_name(dtype, key=None):
    """The safetensors name of a torch dtype (``torch.bfloat16`` -> ``"BF16"``); ValueError
    naming ``key`` for a dtype that safetensors cannot store here."""
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise ValueError(f"tensor {key!r}: dtype {dtype} cannot be stored in safetensors "
                         f"(supported: {', '.join(str(d) for d in DTYPES.values())})") from None


def load_json_strict(text):
    """``json.loads`` that refuses an object with a repeated key (ValueError naming it) instead
    of keeping the last one silently."""
    def pairs(items):
        obj = {}
        for k, v in items:
            if k in obj:
                raise ValueError(f"key {k!r} appears twice")
            obj[k] = v
        return obj
    return json.loads(text, object_pairs_hook=pairs)


def nbytes_of(shape, dtype):
    """Bytes of a C-contiguous tensor of ``shape`` and torch ``dtype``."""
    n = dtype.itemsize
    for s in shape:
        n *= s
    return n


@dataclass(frozen=True)
class HeaderEntry:
    """One tensor of a safetensors header: offsets are absolute in the file."""
    dtype: torch.dtype
    shape: tuple
    begin: int
    end: int


@dataclass(frozen=True)
class Header:
    """A parsed, validated safetensors header: ``raw`` is the 8-byte length plus the JSON bytes;
    ``entries`` maps keys to entries in data-offset order."""
    raw: bytes
    metadata: dict
    entries: dict


def read_header(path):
    """Parse and validate the header of the safetensors file at ``path``.

    Checks, naming the file (and key): the file holds the 8-byte length and the JSON it
    announces; the JSON is an object of tensor entries with a known dtype, a shape of
    non-negative ints and ``data_offsets`` whose span equals shape x dtype size; the spans tile
    the data buffer exactly up to the end of the file. Reads only the header bytes.
    Returns a ``Header``; raises ``CheckpointError``.
    """
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{path}: {size} bytes, too short for a safetensors file "
                                      "(truncated?)")
            (n,) = struct.unpack("<Q", prefix)
            if n > min(MAX_HEADER_BYTES, size - 8):
                raise CheckpointError(f"{path}: header length {n} does not fit in the file of "
                                      f"{size} bytes (truncated or corrupt)")
            body = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e}") from e
    try:
        header = load_json_strict(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path}: header is not valid JSON ({e}): corrupt file") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header is not a JSON object: corrupt file")
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + n
    entries = {}
    for key, value in header.items():
        entries[key] = _entry(path, key, value, data_start)
    ordered = sorted(entries.items(), key=lambda kv: (kv[1].begin, kv[1].end))
    at = data_start
    for key, e in ordered:
        if e.begin != at:
            raise CheckpointError(f"{path}: tensor {key!r} starts at buffer offset "
                                  f"{e.begin - data_start}, expected {at - data_start} "
                                  "(gap or overlap in data_offsets): corrupt file")
        at = e.end
    if at != size:
        raise CheckpointError(f"{path}: tensors end at byte {at} but the file has {size} bytes "
                              f"({'truncated' if at > size else 'trailing bytes'})")
    return Header(raw=prefix + body, metadata=metadata, entries=dict(ordered))


def _entry(path, key, value, data_start):
    """Validate one header entry (see ``read_header``) and make it absolute."""
    where = f"{path}: tensor {key!r}"
    if not isinstance(value, dict):
        raise CheckpointError(f"{where}: header entry is not an object: corrupt file")
    name = value.get("dtype")
    if name not in DTYPES:
        raise CheckpointError(f"{where}: unsupported dtype {name!r} "
                              f"(supported: {', '.join(DTYPES)})")
    shape = value.get("shape")
    offsets = value.get("data_offsets")
    if (not isinstance(shape, list)
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)):
        raise CheckpointError(f"{where}: bad shape {shape!r}: corrupt file")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise CheckpointError(f"{where}: bad data_offsets {offsets!r}: corrupt file")
    dtype = DTYPES[name]
    expected = nbytes_of(shape, dtype)
    if offsets[1] - offsets[0] != expected:
        raise CheckpointError(f"{where}: data_offsets {offsets} span {offsets[1] - offsets[0]} "
                              f"bytes but shape {shape} of {name} needs {expected}: corrupt file")
    return HeaderEntry(dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1])


def layout(entries):
    """Order ``(key, shape, dtype)`` entries as safetensors' ``save_file`` lays them out:
    dtype rank descending (see ``_ENUM_ORDER``), then key (byte order)."""
    return sorted(entries, key=lambda e: (-_RANK[dtype_name(e[2], e[0])], e[0].encode("utf-8")))


def build_header(entries, metadata):
    """Header bytes (length prefix included) and buffer offsets for ``(key, shape, dtype)``
    entries, byte-identical to ``save_file``'s: compact JSON, ``__metadata__`` first, tensors in
    ``layout`` order, spaces padding ``8 + n`` to a multiple of 8.

    Returns ``(raw_header, {key: (begin, end)})`` with offsets relative to the data buffer.
    """
    obj = {"__metadata__": dict(metadata)} if metadata else {}
    offsets = {}
    at = 0
    for key, shape, dtype in layout(entries):
        end = at + nbytes_of(shape, dtype)
        obj[key] = {"dtype": dtype_name(dtype, key), "shape": list(shape),
                    "data_offsets": [at, end]}
        offsets[key] = (at, end)
        at = end
    body = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    body += b" " * (-len(body) % 8)
    return struct.pack("<Q", len(body)) + body, offsets
