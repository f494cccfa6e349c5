"""The planned-offset shard writer and atomic file helpers.

Output shards are planned from tensor headers alone (names, shapes, dtypes), so every tensor's
offset is known before any data exists; each tensor is then written straight to its offset and
nothing larger than one tensor is held in memory. Every file is written under a temporary name
(``.NAME.partial`` in the same folder) and renamed when complete: nothing under a final name is
ever partial.
"""
import contextlib
import ctypes
import json
import mmap
import os
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import NamedTuple

import torch
import xxhash

from nlmerge.io.format import HeaderEntry, build_header, dtype_name, nbytes_of

SHARD_METADATA = {"format": "pt"}
# The content hash of written files (the resume manifest's check): xxh3-128 detects a changed or
# damaged shard as surely as sha256 does without an adversary (a user who can change a shard can
# change the manifest too), at about nine times its speed: sha256 of the output took a quarter of
# a task-arithmetic job's time on two cores (benchmarks/RESULTS.md, session 7).
DIGEST = "xxh3_128"


def new_digest(data=b""):
    """A running ``DIGEST`` hash object (``update``, ``copy``, ``hexdigest``) fed ``data``."""
    return xxhash.xxh3_128(data)


def parse_size(value):
    """A shard size as mergekit's ``--out-shard-size`` parses it: an int, a string of digits,
    or digits followed by ``K``/``M``/``B`` (either case) meaning x1e3 / x1e6 / x1e9
    (``"5B"`` -> 5_000_000_000). ValueError naming the value otherwise (``"1.5B"`` included,
    as in mergekit)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    scale = {"k": 10**3, "m": 10**6, "b": 10**9}
    if isinstance(value, str):
        digits, unit = (value[:-1], value[-1].lower()) if value[-1:].isalpha() else (value, "")
        if digits.isdigit() and (unit == "" or unit in scale):
            return int(digits) * scale.get(unit, 1)
    raise ValueError(f"shard size {value!r}: expected an integer, optionally followed by K, M "
                     "or B (1e3, 1e6, 1e9)")


@dataclass(frozen=True)
class ShardPlan:
    """One planned output file: ``name`` (its final file name), ``entries`` ({key:
    ``HeaderEntry``} in the order the keys were planned; offsets absolute in the file),
    ``header`` (the header bytes, length prefix included), ``size`` (the file's total bytes) and
    ``nbytes`` (its tensor data bytes)."""
    name: str
    entries: dict
    header: bytes
    size: int
    nbytes: int

    @property
    def keys(self):
        """The shard's keys in planned order."""
        return list(self.entries)

    @property
    def file_order(self):
        """The shard's keys in the order of their bytes in the file (writing them in this order
        lets :class:`ShardWriter` hash the file as it is written)."""
        return sorted(self.entries, key=lambda key: self.entries[key].begin)


def plan_shards(entries, max_shard_bytes, basename="model"):
    """Split ``(key, shape, dtype)`` entries into output shards the way mergekit's writer does.

    Rule (mergekit's ``TensorWriter``): walk the entries in order; start a new shard when the
    current one is non-empty and adding the tensor's bytes (numel x element size) would take it
    over ``max_shard_bytes``; ``max_shard_bytes <= 0`` means one shard. So a tensor larger than
    the limit gets a shard of its own. mergekit documents ``--out-shard-size`` as parameters per
    shard, but its writer counts bytes; this follows the writer, so the output layout is
    mergekit's. One shard is named ``{basename}.safetensors``; N > 1 are
    ``{basename}-00001-of-0000N.safetensors``...; no entries give no shards. Inside a shard the
    data is laid out as ``safetensors.torch.save_file`` lays it out (dtype rank, then name), so a
    shard's bytes equal ``save_file(tensors, metadata={"format": "pt"})``.

    Returns a list of ``ShardPlan``. ValueError naming the key for a repeated key, a dtype that
    safetensors cannot store, or a shape that is not a sequence of non-negative ints.
    """
    groups, seen = [], set()
    current, current_bytes = [], 0
    for key, shape, dtype in entries:
        shape = _checked_shape(key, shape)
        dtype_name(dtype, key)
        if key in seen:
            raise ValueError(f"tensor {key!r} is planned twice")
        seen.add(key)
        nbytes = nbytes_of(shape, dtype)
        if current and max_shard_bytes > 0 and current_bytes + nbytes > max_shard_bytes:
            groups.append(current)
            current, current_bytes = [], 0
        current.append((key, shape, dtype))
        current_bytes += nbytes
    if current:
        groups.append(current)
    n = len(groups)
    names = ([f"{basename}.safetensors"] if n == 1 else
             [f"{basename}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)])
    return [_plan_one(name, group) for name, group in zip(names, groups)]


def _checked_shape(key, shape):
    try:
        shape = tuple(shape)
    except TypeError:
        shape = None
    if shape is None or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                                for s in shape):
        raise ValueError(f"tensor {key!r}: shape must be a sequence of non-negative ints")
    return shape


def _plan_one(name, group):
    header, offsets = build_header(group, SHARD_METADATA)
    start = len(header)
    entries = {key: HeaderEntry(dtype, shape, start + offsets[key][0], start + offsets[key][1])
               for key, shape, dtype in group}
    nbytes = sum(e.end - e.begin for e in entries.values())
    return ShardPlan(name, entries, header, start + nbytes, nbytes)


def write_checkpoint(out_dir, entries, tensor_of, max_shard_bytes, basename="model"):
    """Write a checkpoint in the Hugging Face layout: ``entries`` (``(key, shape, dtype)``, see
    :func:`plan_shards`) in shards of at most ``max_shard_bytes``, each tensor from
    ``tensor_of(key)`` (called once per key, in file order, one tensor held at a time), then the
    index when there are several shards. Every file appears under its final name only when
    complete. Returns the ``WrittenShard`` of each shard."""
    plans = plan_shards(entries, max_shard_bytes, basename)
    written = []
    for plan in plans:
        with ShardWriter(plan, out_dir) as writer:
            for key in plan.file_order:
                writer.write(key, tensor_of(key))
            written.append(writer.finish())
    index = shard_index(plans)
    if index is not None:
        write_json_atomic(os.path.join(os.fspath(out_dir), f"{basename}.safetensors.index.json"), index)
    return written


def shard_index(plans):
    """The ``model.safetensors.index.json`` object for ``plans``, or None for zero or one shard
    (mergekit and transformers write no index then): ``{"metadata": {"total_size": tensor data
    bytes over all shards}, "weight_map": {key: shard name}}`` in planned key order."""
    if len(plans) <= 1:
        return None
    return {"metadata": {"total_size": sum(p.nbytes for p in plans)},
            "weight_map": {key: p.name for p in plans for key in p.entries}}


class WrittenShard(NamedTuple):
    """A finished file: final ``name``, ``size`` in bytes, ``digest`` (its ``DIGEST``, hex)."""
    name: str
    size: int
    digest: str


def temp_path(final_path):
    """The temporary name a file is written under before it becomes ``final_path``."""
    folder, name = os.path.split(final_path)
    return os.path.join(folder, f".{name}.partial")


def _publish(tmp, final):
    """Rename the complete, fsynced ``tmp`` to ``final`` and make the rename durable."""
    os.replace(tmp, final)
    fd = os.open(os.path.dirname(final) or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_digest(path):
    """The ``DIGEST`` (hex) of the file at ``path``."""
    with open(path, "rb") as f:
        return _hash_file(new_digest(), f.fileno(), 0).hexdigest()


def _hash_file(hasher, fd, offset):
    """``hasher`` fed the bytes of the open file ``fd`` from ``offset`` to its end, through a
    read-only mapping: no copy, four times the speed of reading them (2 GB in 0.16 s against
    0.4-0.6 s, benchmarks/RESULTS.md, session 7)."""
    size = os.fstat(fd).st_size
    if offset < size:
        with mmap.mmap(fd, size, access=mmap.ACCESS_READ) as mapped, memoryview(mapped) as view:
            for start in range(offset, size, 1 << 24):
                with view[start:start + (1 << 24)] as chunk:
                    hasher.update(chunk)
    return hasher


class ShardWriter:
    """Writes one planned shard: ``write`` each key of ``plan`` once, in any order, then
    ``finish``.

    The file is created as ``.NAME.partial`` in ``out_dir``, sized to its final size (sparse),
    with the header written first. Each ``write`` stores its bytes on the writer's own thread
    while the caller goes on (one write in flight: memory stays at one tensor), hashing them on
    another as it goes when the keys come in file order (:attr:`ShardPlan.file_order`); ``finish``
    otherwise hashes the file by reading it back. ``write(key, tensor, replace=True)`` overwrites a
    written key before ``finish`` (``finish`` then reads the file back to hash it, at about
    10 GB/s). ``reopen=True`` opens the finished shard of ``plan`` again to replace some of its
    tensors (a global TIES job's keys filled before the model-wide majority sign was known): the
    file is checked against the plan (size and header; ValueError naming it otherwise) and renamed
    back to its temporary name, so nothing under the final name is ever partial, and every key
    counts as written. A written tensor must not change until the next ``write`` or ``finish``
    returns (its bytes may still be in flight). Any error in ``write`` or ``finish`` aborts: the
    temporary file is removed and the error re-raised (an error of a write in flight surfaces at
    the next ``write`` or at ``finish``); leaving a ``with`` block without ``finish`` aborts too.
    Byte order is the host's, which must be little-endian (as safetensors assumes).
    """

    def __init__(self, plan, out_dir, *, reopen=False):
        if sys.byteorder != "little":
            raise RuntimeError("safetensors files are little-endian; this host is not")
        self.plan = plan
        self.final_path = os.path.join(os.fspath(out_dir), plan.name)
        self.temp_path = temp_path(self.final_path)
        self._written = set(plan.entries) if reopen else set()
        self._fd = None
        # storing and hashing a tensor run side by side, each on its own thread
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nlmerge-write")
        self._hash_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nlmerge-hash")
        self._in_flight = []
        # the running hash of the file's bytes [0, _hashed_to), None once a write skips ahead or replaces
        self._hash, self._hashed_to = (None, 0) if reopen else (new_digest(plan.header), len(plan.header))
        if reopen:
            self._check_finished_file()
            os.replace(self.final_path, self.temp_path)
        try:
            if reopen:
                self._fd = os.open(self.temp_path, os.O_RDWR)
            else:
                self._fd = os.open(self.temp_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
                # sized, not preallocated: writing into fallocated (unwritten) extents is about 3x
                # slower on ext4 (benchmarks/RESULTS.md); the job checks free space up front instead
                os.ftruncate(self._fd, plan.size)
                _pwrite_all(self._fd, memoryview(plan.header), 0)
        except BaseException:
            self.abort()
            raise

    def _check_finished_file(self):
        """ValueError naming the file when the shard to reopen is not the plan's (size, header)."""
        with open(self.final_path, "rb") as f:
            size, header = os.fstat(f.fileno()).st_size, f.read(len(self.plan.header))
        if size != self.plan.size or header != self.plan.header:
            raise ValueError(f"{self.final_path}: not the planned shard {self.plan.name} "
                             f"({size} bytes, planned {self.plan.size}, or another header)")

    def write(self, key, tensor, *, replace=False):
        """Write ``tensor`` (any device; its shape and dtype must equal the plan's) at the
        planned offset of ``key``; with ``replace``, over the tensor already written there.
        ValueError naming the key and the shard for a key not in the plan, one written twice (or
        replaced before it was written), or a shape or dtype mismatch (both values given)."""
        with self._aborting():
            entry = self.plan.entries.get(key)
            where = f"shard {self.plan.name}: tensor {key!r}"
            if entry is None:
                raise ValueError(f"{where} is not planned for this shard")
            if (key in self._written) != replace:
                raise ValueError(f"{where} is {'replaced before it is written' if replace else 'written twice'}")
            if not isinstance(tensor, torch.Tensor):
                raise ValueError(f"{where}: expected a tensor, got {type(tensor).__name__}")
            if tuple(tensor.shape) != entry.shape or tensor.dtype != entry.dtype:
                raise ValueError(f"{where}: got shape {tuple(tensor.shape)} {tensor.dtype}, "
                                 f"planned {entry.shape} {entry.dtype}")
            # raw little-endian bytes; a uint8 view also carries bf16/fp8/bool, which numpy lacks
            data = memoryview(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
            self._settle()
            self._in_flight = [self._pool.submit(self._store, data, entry.begin)]
            if self._hash is not None and not replace and entry.begin == self._hashed_to:
                # the bytes follow those already hashed (and settled): the file's hash grows in order
                self._in_flight.append(self._hash_pool.submit(self._hash.update, data))
                self._hashed_to = entry.end
            else:
                self._hash = None
            self._written.add(key)

    def _store(self, data, offset):
        _pwrite_all(self._fd, data, offset)
        _start_writeback(self._fd, offset, len(data))

    def _settle(self):
        """Wait for the write (and hash) in flight, re-raising an error."""
        futures, self._in_flight = self._in_flight, []
        for future in futures:
            future.result()

    def finish(self, *, record=None):
        """Check that every planned key was written, flush and fsync, hash, and rename to the
        final name. ``record``, when given, is called with the ``WrittenShard`` once the file is
        complete and before the rename (a resume manifest's ``record``: whenever the process
        stops, a file under its final name is recorded; an error in ``record`` aborts). Returns
        ``WrittenShard(name, size, digest)``; ValueError naming the shard and the missing keys
        otherwise."""
        with self._aborting():
            missing = [k for k in self.plan.entries if k not in self._written]
            if missing:
                raise ValueError(f"shard {self.plan.name}: {len(missing)} planned tensor(s) never "
                                 f"written: {missing[:5]}")
            self._settle()
            os.fsync(self._fd)
            digest = self._digest()
            os.close(self._fd)
            self._fd = None
            self._shutdown()
            written = WrittenShard(self.plan.name, self.plan.size, digest)
            if record is not None:
                record(written)
            _publish(self.temp_path, self.final_path)
        return written

    def _digest(self):
        """The file's digest: the running hash, or the file read back when it was not written in
        order or a key was replaced."""
        if self._hash is None or self._hashed_to != self.plan.size:
            return file_digest(self.temp_path)
        return self._hash.hexdigest()

    def abort(self):
        """Close and remove the temporary file (nothing under the final name is touched)."""
        with contextlib.suppress(BaseException):
            self._settle()
        self._shutdown()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.temp_path)

    def _shutdown(self):
        self._pool.shutdown()
        self._hash_pool.shutdown()

    @contextlib.contextmanager
    def _aborting(self):
        if self._fd is None:
            raise ValueError(f"shard {self.plan.name}: writer is already finished or aborted")
        try:
            yield
        except BaseException:
            self.abort()
            raise

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.abort()


def _pwrite_all(fd, view, offset):
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


_SYNC_FILE_RANGE_WRITE = 2  # linux/fs.h
_sync_file_range = getattr(ctypes.CDLL(None, use_errno=True), "sync_file_range", None)
if _sync_file_range is not None:
    _sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]


def _start_writeback(fd, offset, nbytes):
    """Start writing ``nbytes`` at ``offset`` to disk without waiting (Linux ``sync_file_range``;
    a no-op elsewhere), so that the fsync finishing a shard waits for its last tensors only."""
    if _sync_file_range is not None:
        _sync_file_range(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)


@contextlib.contextmanager
def _atomic_file(path):
    """Yield a binary file open at ``path``'s temporary name; on success fsync and rename it to
    ``path``, on error remove it."""
    path = os.fspath(path)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        _publish(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def check_apart(out, inputs, remedy="write it elsewhere"):
    """Raise FileExistsError when the output path ``out`` is, holds or lies inside one of the
    ``inputs`` (files or folders; links resolved): writing or replacing it could destroy what the
    job reads. The message names both paths."""
    real = os.path.realpath(out)
    for path in inputs:
        src = os.path.realpath(path)
        if src == real or src.startswith(real + os.sep) or real.startswith(src + os.sep):
            raise FileExistsError(f"output {os.fspath(out)!r} overlaps the input {os.fspath(path)!r}; {remedy}")


LOCK_NAME = ".nlmerge.lock"


class OutputInUseError(FileExistsError):
    """The output folder is locked by another running nlmerge job."""


def check_output_folder(out):
    """FileExistsError when the output path ``out`` cannot be a folder: a symbolic link to nothing,
    or something other than a folder."""
    out = os.fspath(out)
    if os.path.islink(out) and not os.path.exists(out):
        raise FileExistsError(f"output {out!r} is a symbolic link to {os.readlink(out)!r}, which does not exist; "
                              "create that folder or give another output")
    if os.path.exists(out) and not os.path.isdir(out):
        raise FileExistsError(f"output {out!r} exists and is not a folder")


@contextlib.contextmanager
def lock_output(out):
    """Hold an exclusive lock on the output folder ``out`` while the block runs: ``fcntl.flock``
    on ``OUT/.nlmerge.lock`` (``out`` is created if needed). Yields whether this call created
    ``out``.

    A job that finds the folder locked is refused at once with OutputInUseError naming the folder.
    On exit the lock file is removed, and ``out`` too when this call created it and it is empty.
    The lock file is not an output: :func:`output_entries` leaves it out, and a lock file that a
    killed job left behind locks nothing. FileExistsError when ``out`` exists and is not a folder.
    """
    out = os.fspath(out)
    check_output_folder(out)
    created = not os.path.isdir(out)
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, LOCK_NAME)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            taken = _take_lock(fd)
        except OSError as err:  # a file system without locks
            os.close(fd)
            raise OSError(err.errno, f"output folder {out!r}: cannot lock {path}: {err.strerror}") from None
        if not taken:
            os.close(fd)
            raise OutputInUseError(f"output folder {out!r} is in use by another nlmerge job (it holds "
                                   f"{LOCK_NAME} there); wait for that job to end or write elsewhere")
        # the previous holder removes the file before it unlocks: a lock taken on the file it
        # removed (opened just before) would not exclude a job that opens the new one; try again
        with contextlib.suppress(FileNotFoundError):
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                break
        os.close(fd)
    try:
        yield created
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
        os.close(fd)
        if created:
            with contextlib.suppress(OSError):  # not empty: the job's outputs
                os.rmdir(out)


def _take_lock(fd):
    """Take :func:`lock_output`'s exclusive lock on the open file ``fd`` without waiting: False when
    another open file of it (another job, or another open in this process) holds the lock."""
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def lock_held(path):
    """Whether a running job holds the lock file at ``path``: :func:`lock_output`'s ``OUT/.nlmerge.lock``
    or another hard link to it (the lock is the file's, whatever its name). Tried without waiting
    and let go at once; a lock file that a killed job left behind is not held. FileNotFoundError
    when there is no such file."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return not _take_lock(fd)
    finally:
        os.close(fd)  # lets go of a lock taken here


def output_entries(out):
    """The names in the folder ``out``, its lock file (:func:`lock_output`) left out: what a job
    counts as the folder's contents."""
    return [name for name in os.listdir(out) if name != LOCK_NAME]


def write_json_atomic(path, obj):
    """Write ``obj`` as indented JSON (plus a newline) to ``path`` through a temporary name."""
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def write_text_atomic(path, text):
    """Write the str ``text`` (UTF-8) to ``path`` through a temporary name."""
    with _atomic_file(path) as f:
        f.write(text.encode("utf-8"))


def copy_file_atomic(src, dst):
    """Copy the bytes of ``src`` to ``dst`` through a temporary name."""
    with open(src, "rb") as fin, _atomic_file(dst) as fout:
        shutil.copyfileobj(fin, fout)
