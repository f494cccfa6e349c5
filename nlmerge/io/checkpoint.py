"""Lazy, validated readers of checkpoints on disk: Hugging Face folders and single files."""
import hashlib
import json
import os
import threading
import zipfile
from dataclasses import dataclass

import torch
from safetensors import safe_open

from nlmerge.io.format import CheckpointError, load_json_strict, read_header

# the weight files of a Hugging Face folder, in the order transformers looks for them
# (name, True when it is an index of shards)
WEIGHT_FILES = (
    ("model.safetensors", False),
    ("model.safetensors.index.json", True),
    ("pytorch_model.bin", False),
    ("pytorch_model.bin.index.json", True),
)


@dataclass(frozen=True)
class TensorInfo:
    """What a checkpoint's header says about one tensor: ``shape`` a tuple of ints, ``dtype`` a
    torch dtype, ``file`` the path of the data file holding it, ``nbytes`` its data size."""
    key: str
    shape: tuple
    dtype: torch.dtype
    file: str
    nbytes: int


class _SafetensorsFile:
    """One safetensors data file: its validated header, and a ``safe_open`` handle opened on
    first use."""

    def __init__(self, path):
        self.path = path
        self.header = read_header(path)
        self._handle = None

    def infos(self):
        return [TensorInfo(k, e.shape, e.dtype, self.path, e.end - e.begin)
                for k, e in self.header.entries.items()]

    def fingerprint(self):
        return self.header.raw + _sampled_bytes(self.path, len(self.header.raw))

    def reader(self):
        """``key -> tensor``, opening the file on first use (the caller holds the lock)."""
        if self._handle is None:
            try:
                self._handle = safe_open(self.path, framework="pt", device="cpu")
            except Exception as e:  # safetensors raises its own error types
                raise CheckpointError(f"{self.path}: safetensors cannot open it: {e}") from e
        return self._handle.get_tensor

    def close(self):
        self._handle = None


class _TorchFile:
    """One ``pytorch_model*.bin`` file, loaded memory-mapped (tensor data stays on disk until
    touched); only plain dicts of tensors are accepted (``weights_only``: no code runs)."""

    def __init__(self, path):
        self.path = path
        try:
            sd = torch.load(path, mmap=True, weights_only=True, map_location="cpu")
        except Exception as e:  # torch.load raises many types for bad files
            raise CheckpointError(f"{path}: torch.load refuses it: {e}") from e
        if not isinstance(sd, dict):
            raise CheckpointError(f"{path}: holds a {type(sd).__name__}, not a dict of tensors")
        for key, value in sd.items():
            if not isinstance(key, str) or not isinstance(value, torch.Tensor):
                raise CheckpointError(f"{path}: entry {key!r} is a {type(value).__name__}, "
                                      "not a tensor")
        self._sd = sd

    def infos(self):
        return [TensorInfo(k, tuple(t.shape), t.dtype, self.path, t.numel() * t.element_size())
                for k, t in self._sd.items()]

    def fingerprint(self):
        # the zip's central directory holds each record's name, size and CRC-32: a content
        # fingerprint read without touching the tensor data
        with zipfile.ZipFile(self.path) as z:
            return json.dumps([(i.filename, i.file_size, i.CRC) for i in z.infolist()]).encode()

    def reader(self):
        return self._sd.__getitem__

    def close(self):
        self._sd = {}


# identity() reads this many blocks of this size spread over each file's data: two fine-tunes
# of one architecture have equal headers, and sampling tells them apart cheaply
_SAMPLES, _SAMPLE_BYTES = 16, 4096


def _sampled_bytes(path, start):
    """``_SAMPLES`` blocks of ``_SAMPLE_BYTES`` spread evenly over ``path`` from ``start`` to
    its end (all of it when that is shorter)."""
    span = os.path.getsize(path) - start
    with open(path, "rb") as f:
        if span <= _SAMPLES * _SAMPLE_BYTES:
            f.seek(start)
            return f.read()
        step = (span - _SAMPLE_BYTES) // (_SAMPLES - 1)
        blocks = []
        for i in range(_SAMPLES):
            f.seek(start + i * step)
            blocks.append(f.read(_SAMPLE_BYTES))
        return b"".join(blocks)


def _open_data_file(path):
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: data file does not exist")
    return _TorchFile(path) if path.endswith(".bin") else _SafetensorsFile(path)


class Checkpoint:
    """A checkpoint opened by ``open_checkpoint``: headers read and validated, tensors read one
    at a time on ``get``.

    Attributes: ``path`` (what was opened), ``files`` (the data files, in order), ``config``
    (the parsed ``config.json`` of a folder, else None). Keys are ordered file by file, and in
    a file by data offset (safetensors) or stored order (``.bin``). Usable as a context manager;
    thread-safe for concurrent ``get``.
    """

    def __init__(self, path, data_files, config):
        self.path = path
        self.files = [f.path for f in data_files]
        self.config = config
        self._data = {f.path: f for f in data_files}
        self._infos = {i.key: i for f in data_files for i in f.infos()}
        self._lock = threading.Lock()
        self._closed = False

    def keys(self):
        """The tensor names, in checkpoint order (a new list)."""
        return list(self._infos)

    def __contains__(self, key):
        return key in self._infos

    def __len__(self):
        return len(self._infos)

    def info(self, key):
        """``TensorInfo`` of ``key``; KeyError naming the key and the checkpoint."""
        try:
            return self._infos[key]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor {key!r}") from None

    def get(self, key):
        """Read the tensor ``key`` (CPU, the stored dtype and shape) from its file alone; for
        ``.bin`` files a memory-mapped tensor that must not be written to."""
        file = self._data[self.info(key).file]
        with self._lock:  # only opening is serialized; reads run concurrently
            if self._closed:
                raise ValueError(f"{self.path}: checkpoint is closed")
            read = file.reader()
        return read(key)

    def identity(self):
        """A stable fingerprint (sha256 hex) of the weights, cheap to compute: over the data
        files sorted by name, each file's name, size, header bytes and 16 blocks of 4 KiB
        sampled evenly from its data (for ``.bin``: the zip directory's record names, sizes and
        CRC-32s). Equal for a copy of the folder elsewhere; differs between fine-tunes of one
        architecture (their headers are equal, their sampled bytes are not)."""
        h = hashlib.sha256()
        for path in sorted(self.files, key=os.path.basename):
            name = os.path.basename(path).encode("utf-8")
            h.update(len(name).to_bytes(8, "little") + name)
            h.update(os.path.getsize(path).to_bytes(8, "little"))
            fp = self._data[path].fingerprint()
            h.update(len(fp).to_bytes(8, "little") + fp)
        return h.hexdigest()

    def close(self):
        """Drop open file handles and memory maps; ``get`` fails afterwards."""
        with self._lock:
            self._closed = True
            for f in self._data.values():
                f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_checkpoint(path, *, basename=None):
    """Open the checkpoint at ``path`` lazily and validate every header before returning.

    ``path`` is a folder in the Hugging Face layout — ``model.safetensors``, shards listed by
    ``model.safetensors.index.json`` (``weight_map``), ``pytorch_model.bin`` or shards listed by
    ``pytorch_model.bin.index.json``, looked for in that order (transformers' order); with
    ``basename``, ``{basename}.safetensors`` or ``{basename}.safetensors.index.json`` only — or a
    single ``.safetensors`` file. Raises ``CheckpointError`` naming the file (and key) when the
    path is missing, a folder holds none of those, an index is unparsable, names a missing
    shard or a key that its shard does not hold, a shard holds a key that the index does not
    map to it, a key is held by two shards, a safetensors file is truncated or corrupt (header
    checked against the file size, see ``format.read_header``), or ``torch.load`` refuses a
    ``.bin``.
    """
    path = os.fspath(path)
    if os.path.isfile(path):
        if not path.endswith(".safetensors"):
            raise CheckpointError(f"{path}: not a .safetensors file or a Hugging Face folder")
        return _build(path, [path], None, None)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such file or folder")
    names = WEIGHT_FILES if basename is None else ((f"{basename}.safetensors", False),
                                                   (f"{basename}.safetensors.index.json", True))
    for name, is_index in names:
        found = os.path.join(path, name)
        if os.path.isfile(found):
            break
    else:
        looked = ", ".join(name for name, _ in names)
        raise CheckpointError(f"{path}: no model weights found (looked for {looked}; "
                              "adapter files are not models)")
    if is_index:
        weight_map = _read_index(found)
        files = [os.path.join(path, s) for s in sorted(set(weight_map.values()))]
    else:
        weight_map, files = None, [found]
    return _build(path, files, weight_map, _read_config(path))


def _build(path, files, weight_map, config):
    """Open ``files``, check them against the index's ``weight_map`` (None: no index) and
    return the Checkpoint; data files are closed again if a check fails."""
    data = []
    try:
        for f in files:
            data.append(_open_data_file(f))
        holder = {}
        for f in data:
            for info in f.infos():
                if info.key in holder:
                    raise CheckpointError(f"{path}: tensor {info.key!r} is held by two shards: "
                                          f"{holder[info.key]} and {f.path}")
                holder[info.key] = f.path
        if weight_map is not None:
            _check_index(path, weight_map, holder)
        return Checkpoint(path, data, config)
    except BaseException:
        for f in data:
            f.close()
        raise


def _check_index(path, weight_map, holder):
    """Every key of the index is in the shard it names, and every shard key is indexed there."""
    for key, shard in weight_map.items():
        shard_path = os.path.join(path, shard)
        if holder.get(key) != shard_path:
            raise CheckpointError(f"{shard_path}: the index maps tensor {key!r} to this shard "
                                  "but it does not hold it")
    for key, shard_path in holder.items():
        if key not in weight_map:
            raise CheckpointError(f"{shard_path}: holds tensor {key!r} that the index does not "
                                  "list")


def _read_index(index_path):
    """The ``weight_map`` of an index file, checked to be {key: shard file in this folder}."""
    try:
        with open(index_path, encoding="utf-8") as f:
            index = load_json_strict(f.read())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{index_path}: unreadable index: {e}") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_path}: no 'weight_map' object of tensor -> shard file")
    folder = os.path.dirname(index_path)
    for key, shard in weight_map.items():
        if (not isinstance(shard, str) or os.path.basename(shard) != shard
                or shard in ("", ".", "..")):
            raise CheckpointError(f"{index_path}: tensor {key!r} maps to {shard!r}, "
                                  "not a file name in the folder")
        if not os.path.isfile(os.path.join(folder, shard)):
            raise CheckpointError(f"{index_path}: tensor {key!r} maps to shard {shard!r}, "
                                  "which does not exist")
    return weight_map


def _read_config(folder):
    """The parsed ``config.json`` of ``folder``, or None when there is none."""
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable config: {e}") from None
