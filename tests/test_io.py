"""nlmerge.io: checkpoint readers on generated HF folders, their validation errors, the
planned-offset shard writer (against safetensors' save_file and mergekit's TensorWriter) and the
resume manifest."""
import json
import os
import shutil
import struct

import pytest
import torch
import xxhash
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from nlmerge.io import (CheckpointError, Manifest, ShardWriter, copy_file_atomic, open_checkpoint,
                        parse_size, plan_shards, shard_index, write_json_atomic)
from nlmerge.io import manifest as manifest_module
from nlmerge.io import writer as writer_module

transformers = pytest.importorskip("transformers")


# --------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny LlamaForCausalLM (hidden 32, 2 layers) saved four ways; returns (model, folders)."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    model = transformers.LlamaForCausalLM(cfg).eval()
    root = tmp_path_factory.mktemp("llama")
    folders = {"single": root / "single", "sharded": root / "sharded",
               "bin": root / "bin", "bin_sharded": root / "bin_sharded"}
    model.save_pretrained(folders["single"])
    model.save_pretrained(folders["sharded"], max_shard_size="20KB")
    # transformers 5 writes safetensors only: .bin checkpoints are written by hand
    sd = model.state_dict()
    for name in ("bin", "bin_sharded"):
        folders[name].mkdir()
        shutil.copy(folders["single"] / "config.json", folders[name])
    torch.save(sd, folders["bin"] / "pytorch_model.bin")
    keys = list(sd)
    halves = {"pytorch_model-00001-of-00002.bin": keys[: len(keys) // 2],
              "pytorch_model-00002-of-00002.bin": keys[len(keys) // 2:]}
    for file, ks in halves.items():
        torch.save({k: sd[k] for k in ks}, folders["bin_sharded"] / file)
    (folders["bin_sharded"] / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: f for f, ks in halves.items() for k in ks}}))
    return model, folders


def _header(path):
    """The JSON header of a safetensors file, parsed independently of nlmerge."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


def _write_raw(path, header, data):
    """A safetensors file from a header dict and data bytes, unchecked (for corrupt cases)."""
    body = json.dumps(header).encode()
    body += b" " * (-len(body) % 8)
    path.write_bytes(struct.pack("<Q", len(body)) + body + data)


def _assert_bits_equal(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(a.contiguous().reshape(-1).view(torch.uint8),
                       b.contiguous().reshape(-1).view(torch.uint8))


# --------------------------------------------------------------------------- readers

@pytest.mark.parametrize("layout", ["single", "sharded", "bin", "bin_sharded"])
def test_reader_matches_state_dict(llama, layout):
    model, folders = llama
    sd = model.state_dict()
    with open_checkpoint(folders[layout]) as ckpt:
        assert sorted(ckpt.keys()) == sorted(sd)
        assert ckpt.config["hidden_size"] == 32
        for key in ckpt.keys():
            info = ckpt.info(key)
            assert (info.key, info.shape, info.dtype) == (key, tuple(sd[key].shape), sd[key].dtype)
            assert info.nbytes == sd[key].numel() * sd[key].element_size()
            assert os.path.dirname(info.file) == str(folders[layout])
            _assert_bits_equal(ckpt.get(key), sd[key])


def test_sharded_reader_follows_index(llama):
    _, folders = llama
    folder = folders["sharded"]
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    shards = sorted(set(index.values()))
    assert len(shards) == 7
    with open_checkpoint(folder) as ckpt:
        assert ckpt.files == [str(folder / s) for s in shards]
        # keys: file order, then data offset inside each file
        expected = []
        for s in shards:
            h = _header(folder / s)
            h.pop("__metadata__", None)
            expected += sorted(h, key=lambda k: h[k]["data_offsets"])
        assert ckpt.keys() == expected
        assert all(os.path.basename(ckpt.info(k).file) == index[k] for k in ckpt.keys())


def test_bin_reader_keeps_saved_order(llama):
    model, folders = llama
    with open_checkpoint(folders["bin"]) as ckpt:
        assert ckpt.keys() == list(model.state_dict())
        assert ckpt.files == [str(folders["bin"] / "pytorch_model.bin")]


def test_single_file_and_identity(llama, tmp_path):
    _, folders = llama
    file = folders["single"] / "model.safetensors"
    with open_checkpoint(file) as ckpt:
        assert ckpt.files == [str(file)] and ckpt.config is None
        ident = ckpt.identity()
    # a copy elsewhere has the same identity; same shapes with one changed value does not
    shutil.copytree(folders["single"], tmp_path / "copy")
    same = open_checkpoint(folders["single"]).identity()
    assert open_checkpoint(tmp_path / "copy").identity() == same
    assert open_checkpoint(tmp_path / "copy" / "model.safetensors").identity() == ident
    sd = load_file(file)
    key = next(iter(sd))
    sd[key] = sd[key].clone()
    sd[key].view(-1)[0] += 1
    save_file(sd, tmp_path / "changed.safetensors", metadata={"format": "pt"})
    assert open_checkpoint(tmp_path / "changed.safetensors").identity() != ident
    bins = [open_checkpoint(folders[n]).identity() for n in ("bin", "bin_sharded")]
    assert bins[0] != bins[1]


def test_get_after_close_and_unknown_key(llama):
    _, folders = llama
    ckpt = open_checkpoint(folders["single"])
    with pytest.raises(KeyError, match="nope"):
        ckpt.info("nope")
    key = ckpt.keys()[0]
    ckpt.close()
    with pytest.raises(ValueError, match="closed"):
        ckpt.get(key)


# --------------------------------------------------------------------------- validation

def _copy(folders, name, tmp_path):
    return shutil.copytree(folders[name], tmp_path / name)


def _raises_naming(path, *fragments):
    """open_checkpoint(path) raises CheckpointError whose message holds every fragment."""
    with pytest.raises(CheckpointError) as err:
        open_checkpoint(path)
    for f in fragments:
        assert str(f) in str(err.value), (f, str(err.value))
    return str(err.value)


def test_missing_path_and_no_weights(tmp_path):
    _raises_naming(tmp_path / "absent", tmp_path / "absent", "no such file")
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    msg = _raises_naming(tmp_path, tmp_path, "model.safetensors.index.json", "pytorch_model.bin")
    assert "no model weights" in msg
    (tmp_path / "weights.pt").write_bytes(b"")
    _raises_naming(tmp_path / "weights.pt", "weights.pt", "not a .safetensors")


def test_truncated_shard(llama, tmp_path):
    folder = _copy(llama[1], "sharded", tmp_path)
    shard = folder / "model-00003-of-00007.safetensors"
    shard.write_bytes(shard.read_bytes()[:-5])
    _raises_naming(folder, shard, "truncated")
    shard.write_bytes(shard.read_bytes()[:5])
    _raises_naming(folder, shard, "too short")


def test_trailing_bytes(llama, tmp_path):
    folder = _copy(llama[1], "single", tmp_path)
    file = folder / "model.safetensors"
    file.write_bytes(file.read_bytes() + b"\0" * 8)
    _raises_naming(folder, file, "trailing bytes")


@pytest.mark.parametrize("length,fragment", [(2**40, "does not fit"), (9, "not valid JSON")])
def test_bad_header_length(llama, tmp_path, length, fragment):
    folder = _copy(llama[1], "single", tmp_path)
    file = folder / "model.safetensors"
    raw = bytearray(file.read_bytes())
    raw[:8] = struct.pack("<Q", length)
    file.write_bytes(bytes(raw))
    _raises_naming(folder, file, fragment)


@pytest.mark.parametrize("entry,fragment", [
    ({"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}, "needs 12"),
    ({"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}, "gap or overlap"),
    ({"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}, "unsupported dtype 'Q4'"),
    ({"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}, "bad shape"),
    ({"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}, "bad data_offsets"),
])
def test_corrupt_header_entry(tmp_path, entry, fragment):
    file = tmp_path / "bad.safetensors"
    _write_raw(file, {"w": entry, "ok": {"dtype": "U8", "shape": [4], "data_offsets": [8, 12]}},
               b"\0" * 12)
    _raises_naming(file, file, "'w'", fragment)


def test_repeated_header_key(tmp_path):
    file = tmp_path / "dup.safetensors"
    body = b'{"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},' \
           b'"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}'
    body += b" " * (-len(body) % 8)
    file.write_bytes(struct.pack("<Q", len(body)) + body + b"\0")
    _raises_naming(file, file, "'w' appears twice")


def _edit_index(folder, name, edit):
    path = folder / name
    index = json.loads(path.read_text())
    edit(index["weight_map"])
    path.write_text(json.dumps(index))
    return path


def test_index_errors(llama, tmp_path):
    folder = _copy(llama[1], "sharded", tmp_path)
    index_name = "model.safetensors.index.json"
    original = (folder / index_name).read_text()
    key = "model.norm.weight"

    gone = "model-gone.safetensors"
    index = _edit_index(folder, index_name, lambda wm: wm.__setitem__(key, gone))
    _raises_naming(folder, index, "model-gone.safetensors", "does not exist", key)

    (folder / index_name).write_text(original)
    wrong = "model-00001-of-00007.safetensors"
    _edit_index(folder, index_name, lambda wm: wm.__setitem__(key, wrong))
    _raises_naming(folder, folder / wrong, key, "does not hold it")

    (folder / index_name).write_text(original)
    _edit_index(folder, index_name, lambda wm: wm.pop(key))
    _raises_naming(folder, key, "does not list")

    (folder / index_name).write_text(original[:-10])
    _raises_naming(folder, index, "unreadable index")

    (folder / index_name).write_text('{"weight_map": {"a": "x.safetensors", "a": "y.safetensors"}}')
    _raises_naming(folder, index, "'a' appears twice")

    (folder / index_name).write_text(json.dumps({"weight_map": {"a": "../model.safetensors"}}))
    _raises_naming(folder, index, "not a file name")


def test_key_in_two_shards(llama, tmp_path):
    folder = _copy(llama[1], "sharded", tmp_path)
    first, second = "model-00001-of-00007.safetensors", "model-00002-of-00007.safetensors"
    stolen = next(iter(load_file(folder / first)))
    sd2 = load_file(folder / second)
    sd2[stolen] = load_file(folder / first)[stolen]
    save_file(sd2, folder / second, metadata={"format": "pt"})
    _raises_naming(folder, stolen, "held by two shards", first, second)


def test_bin_that_torch_load_refuses(llama, tmp_path):
    folder = _copy(llama[1], "bin", tmp_path)
    file = folder / "pytorch_model.bin"
    file.write_bytes(b"not a zip file at all")
    _raises_naming(folder, file, "torch.load refuses")
    torch.save({"w": torch.zeros(2), "n": 3}, file)
    _raises_naming(folder, file, "'n'", "not a tensor")


def test_bad_config(llama, tmp_path):
    folder = _copy(llama[1], "single", tmp_path)
    (folder / "config.json").write_text("{")
    _raises_naming(folder, folder / "config.json", "unreadable config")


# --------------------------------------------------------------------------- shard planning

def test_parse_size():
    assert parse_size("5B") == 5 * 10**9
    assert parse_size("10k") == 10_000
    assert parse_size("3M") == 3_000_000
    assert parse_size("12") == 12
    assert parse_size(7) == 7
    for bad in ("1.5B", "", "5G", "B", "-1", True):
        with pytest.raises(ValueError, match="shard size"):
            parse_size(bad)


F32, BF16, I64 = torch.float32, torch.bfloat16, torch.int64


def test_plan_against_hand_computed_limits():
    # bytes: a 40, b 60, c 24, d 400 (over the limit alone), e 4
    entries = [("a", (10,), F32), ("b", (3, 10), BF16), ("c", (3,), I64), ("d", (100,), F32),
               ("e", (), F32)]
    plans = plan_shards(entries, 100)
    assert [p.keys for p in plans] == [["a", "b"], ["c"], ["d"], ["e"]]
    assert [p.name for p in plans] == [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)]
    assert [p.nbytes for p in plans] == [100, 24, 400, 4]
    assert all(p.size == len(p.header) + p.nbytes for p in plans)
    index = shard_index(plans)
    assert index == {"metadata": {"total_size": 528},
                     "weight_map": {"a": plans[0].name, "b": plans[0].name, "c": plans[1].name,
                                    "d": plans[2].name, "e": plans[3].name}}
    # 99 splits a from b; no limit (<= 0) or a large one gives one unindexed model.safetensors
    assert [p.keys for p in plan_shards(entries[:2], 99)] == [["a"], ["b"]]
    for limit in (0, -1, 10**9):
        (one,) = plan_shards(entries, limit)
        assert one.name == "model.safetensors" and one.keys == list("abcde")
    assert shard_index(plan_shards(entries, 0)) is None
    assert plan_shards([], 100) == [] and shard_index([]) is None


def test_plan_refuses_bad_entries():
    with pytest.raises(ValueError, match="'a' is planned twice"):
        plan_shards([("a", (1,), F32), ("a", (1,), F32)], 0)
    with pytest.raises(ValueError, match="'z'.*cannot be stored"):
        plan_shards([("z", (1,), torch.complex128)], 0)
    with pytest.raises(ValueError, match="'s'.*non-negative"):
        plan_shards([("s", (2, -1), F32)], 0)


def test_plan_matches_mergekit_tensor_writer(tmp_path):
    tensor_writer = pytest.importorskip("mergekit.io.tensor_writer")
    g = torch.Generator().manual_seed(1)
    tensors = {"embed": torch.randn(16, 8, generator=g),
               "norm": torch.randn(8, generator=g).bfloat16(),
               "big": torch.randn(40, 8, generator=g), "pos": torch.arange(5),
               "flag": torch.tensor(True), "head": torch.randn(16, 8, generator=g).half()}
    for limit in (600, 1000, 0):
        ref, ours = tmp_path / f"mk{limit}", tmp_path / f"nl{limit}"
        with tensor_writer.TensorWriter(str(ref), max_shard_size=limit) as w:
            for k, t in tensors.items():
                w.save_tensor(k, t)
        plans = plan_shards([(k, t.shape, t.dtype) for k, t in tensors.items()], limit)
        ours.mkdir()
        for plan in plans:
            with ShardWriter(plan, ours) as sw:
                for k in plan.keys:
                    sw.write(k, tensors[k])
                sw.finish()
        files = sorted(f for f in os.listdir(ref) if f.endswith(".safetensors"))
        assert files == sorted(os.listdir(ours))
        assert all((ref / f).read_bytes() == (ours / f).read_bytes() for f in files)
        if len(plans) > 1:
            mk_index = json.loads((ref / "model.safetensors.index.json").read_text())
            assert mk_index["weight_map"] == shard_index(plans)["weight_map"]
            total = shard_index(plans)["metadata"]["total_size"]
            assert mk_index["metadata"]["total_size"] == total


# --------------------------------------------------------------------------- shard writing

def _all_dtypes():
    g = torch.Generator().manual_seed(2)
    return {
        "fp32": torch.randn(3, 5, generator=g),
        "bf16": torch.randn(7, generator=g).bfloat16(),
        "fp16": torch.randn(2, 3, generator=g).half(),
        "fp64": torch.randn(4, generator=g).double(),
        "i64": torch.randint(-2**62, 2**62, (6,), generator=g),
        "i32": torch.randint(-9, 9, (3,), generator=g, dtype=torch.int32),
        "i8": torch.randint(-9, 9, (5,), generator=g, dtype=torch.int8),
        "u8": torch.randint(0, 255, (5,), generator=g, dtype=torch.uint8),
        "bool": torch.rand(9, generator=g) > 0.5,
        "f8": torch.randn(4, generator=g).to(torch.float8_e4m3fn),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
        "empty_bf16": torch.zeros(2, 0, dtype=torch.bfloat16),
        "strided": torch.randn(4, 6, generator=g)[:, ::2],
        "nan_bits": torch.tensor([float("nan"), -0.0, float("inf")]),
        "layers.0.é": torch.randn(2, generator=g),
    }


def test_writer_bytes_equal_save_file_and_round_trip(tmp_path):
    tensors = _all_dtypes()
    (plan,) = plan_shards([(k, t.shape, t.dtype) for k, t in tensors.items()], 0)
    with ShardWriter(plan, tmp_path) as w:
        for k in reversed(plan.keys):  # any order: each tensor lands at its planned offset
            w.write(k, tensors[k])
        written = w.finish()
    out = tmp_path / "model.safetensors"
    assert os.listdir(tmp_path) == ["model.safetensors"]
    assert written.name == "model.safetensors" and written.size == out.stat().st_size == plan.size
    save_file({k: t.contiguous() for k, t in tensors.items()}, tmp_path / "ref.st",
              metadata={"format": "pt"})
    assert out.read_bytes() == (tmp_path / "ref.st").read_bytes()
    loaded = load_file(out)
    assert loaded.keys() == tensors.keys()
    for k, t in tensors.items():
        _assert_bits_equal(loaded[k], t)
    with safe_open(out, framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
    with open_checkpoint(out) as ckpt:  # and our reader accepts our files
        for k, t in tensors.items():
            _assert_bits_equal(ckpt.get(k), t)


def test_digest_of_written_shard(tmp_path):
    (plan,) = plan_shards([("w", (3,), F32)], 0)
    with ShardWriter(plan, tmp_path) as w:
        w.write("w", torch.ones(3))
        written = w.finish()
    assert written.digest == xxhash.xxh3_128((tmp_path / plan.name).read_bytes()).hexdigest()


def test_written_llama_loads_in_transformers(llama, tmp_path):
    model, folders = llama
    sd = model.state_dict()
    plans = plan_shards([(k, t.shape, t.dtype) for k, t in sd.items()], parse_size("30K"))
    assert len(plans) > 1
    for plan in plans:
        with ShardWriter(plan, tmp_path) as w:
            for k in plan.keys:
                w.write(k, sd[k])
            w.finish()
    write_json_atomic(tmp_path / "model.safetensors.index.json", shard_index(plans))
    copy_file_atomic(folders["single"] / "config.json", tmp_path / "config.json")
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".partial")]
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.arange(10).reshape(1, 10)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    with open_checkpoint(tmp_path) as ckpt:
        assert ckpt.keys() != [] and sorted(ckpt.keys()) == sorted(sd)


@pytest.mark.parametrize("failure", ["shape", "dtype", "unplanned", "twice", "unfinished",
                                     "missing"])
def test_failed_write_leaves_nothing(tmp_path, failure):
    (plan,) = plan_shards([("a", (4,), F32), ("b", (2,), BF16)], 0)
    bad = {"shape": ("b", torch.zeros(3, dtype=BF16), r"got shape \(3,\).*planned \(2,\)"),
           "dtype": ("b", torch.zeros(2), "torch.float32, planned"),
           "unplanned": ("c", torch.zeros(1), "'c' is not planned"),
           "twice": ("a", torch.zeros(4), "'a' is written twice")}
    if failure in bad:
        key, tensor, msg = bad[failure]
        with pytest.raises(ValueError, match=msg) as err, ShardWriter(plan, tmp_path) as w:
            w.write("a", torch.ones(4))
            w.write(key, tensor)
        assert "model.safetensors" in str(err.value)
        with pytest.raises(ValueError, match="already finished or aborted"):
            w.write("b", torch.zeros(2, dtype=BF16))
    elif failure == "unfinished":
        with ShardWriter(plan, tmp_path) as w:
            w.write("a", torch.ones(4))
            assert os.listdir(tmp_path) == [".model.safetensors.partial"]
    else:
        with pytest.raises(ValueError, match=r"never written: \['b'\]"), \
                ShardWriter(plan, tmp_path) as w:
            w.write("a", torch.ones(4))
            w.finish()
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("order", ["file", "reversed"])
def test_replaced_tensors_before_finish(tmp_path, order):
    tensors = {"a": torch.arange(4, dtype=F32), "b": torch.ones(2, dtype=BF16), "c": torch.arange(3),
               "d": torch.randn(5)}
    (plan,) = plan_shards([(k, t.shape, t.dtype) for k, t in tensors.items()], 0)
    keys = plan.file_order if order == "file" else plan.file_order[::-1]
    new = {"b": torch.tensor([-2.0, 7.5], dtype=BF16), "d": torch.full((5,), 3.0)}
    with ShardWriter(plan, tmp_path) as w:
        with pytest.raises(ValueError, match="'b' is replaced before it is written"):
            w.write("b", new["b"], replace=True)
    with ShardWriter(plan, tmp_path) as w:
        for k in keys:
            w.write(k, tensors[k])
        with pytest.raises(ValueError, match="'a' is written twice"):
            w.write("a", tensors["a"])
    assert os.listdir(tmp_path) == []  # the error aborted the writer
    with ShardWriter(plan, tmp_path) as w:
        for k in keys:
            w.write(k, tensors[k])
        for k in ("d", "b"):
            w.write(k, new[k], replace=True)
        written = w.finish()
    out = tmp_path / plan.name
    save_file({**tensors, **new}, tmp_path / "ref.st", metadata={"format": "pt"})
    assert out.read_bytes() == (tmp_path / "ref.st").read_bytes()
    assert written.size == plan.size
    assert written.digest == xxhash.xxh3_128(out.read_bytes()).hexdigest()



@pytest.mark.parametrize("order", ["file", "reversed"])
@pytest.mark.parametrize("replaced", ["b,d", "d", "", "a"])
def test_reopened_shard_replaces_tensors(tmp_path, order, replaced):
    """A finished shard reopened (a global TIES job's keys filled before the majority was known):
    renamed back to its temporary name while it is open, keys replaced in any order, hashed again
    and renamed into place; aborting removes it. Reopening a file that is not the plan's shard is
    refused naming it, and the file stays."""
    tensors = {"a": torch.arange(4, dtype=F32), "b": torch.ones(2, dtype=BF16), "c": torch.arange(3),
               "d": torch.randn(5), "e": torch.randn(1 << 16)}
    (plan,) = plan_shards([(k, t.shape, t.dtype) for k, t in tensors.items()], 0)
    keys = plan.file_order if order == "file" else plan.file_order[::-1]
    new = {k: -tensors[k] - 1 for k in replaced.split(",") if k}
    with ShardWriter(plan, tmp_path) as w:
        for k in keys:
            w.write(k, tensors[k])
        w.finish()
    out = tmp_path / plan.name
    with ShardWriter(plan, tmp_path, reopen=True) as w:
        assert os.listdir(tmp_path) == [f".{plan.name}.partial"]
        with pytest.raises(ValueError, match="'a' is written twice"):
            w.write("a", tensors["a"])
    assert os.listdir(tmp_path) == []  # aborted: the shard is gone, never half-replaced under its name
    with ShardWriter(plan, tmp_path) as w:
        for k in keys:
            w.write(k, tensors[k])
        w.finish()
    with ShardWriter(plan, tmp_path, reopen=True) as w:
        for k in reversed(list(new)):
            w.write(k, new[k], replace=True)
        written = w.finish()
    save_file({**tensors, **new}, tmp_path / "ref.st", metadata={"format": "pt"})
    assert out.read_bytes() == (tmp_path / "ref.st").read_bytes()
    assert written.digest == xxhash.xxh3_128(out.read_bytes()).hexdigest()
    (other,) = plan_shards([("a", (4,), F32)], 0)
    with pytest.raises(ValueError, match=f"{plan.name}: not the planned shard"):
        ShardWriter(other, tmp_path, reopen=True)
    assert sorted(os.listdir(tmp_path)) == [plan.name, "ref.st"]


def test_atomic_json_and_copy(tmp_path):
    path = tmp_path / "index.json"
    write_json_atomic(path, {"a": [1, 2]})
    assert json.loads(path.read_text()) == {"a": [1, 2]}
    with pytest.raises(TypeError):
        write_json_atomic(path, {"a": object()})
    assert json.loads(path.read_text()) == {"a": [1, 2]}  # the old file is untouched
    copy_file_atomic(path, tmp_path / "copy.json")
    assert (tmp_path / "copy.json").read_bytes() == path.read_bytes()
    assert sorted(os.listdir(tmp_path)) == ["copy.json", "index.json"]


# --------------------------------------------------------------------------- manifest

def test_manifest_round_trip_and_verification(tmp_path):
    assert Manifest.load(tmp_path) is None
    plans = plan_shards([("a", (8,), F32), ("b", (8,), F32)], 32)
    manifest = Manifest(tmp_path, "job-fingerprint")
    for plan in plans:
        with ShardWriter(plan, tmp_path) as w:
            w.write(plan.keys[0], torch.arange(8, dtype=F32))
            manifest.record(w.finish(), extra={"sign_sum": 3})
    manifest.job["thresholds"] = [0.1, 2.5e-7]
    manifest.save()
    loaded = Manifest.load(tmp_path)
    assert loaded.fingerprint == "job-fingerprint" and loaded.shards == manifest.shards
    assert loaded.job == {"thresholds": [0.1, 2.5e-7]}
    assert loaded.extra(plans[1].name) == {"sign_sum": 3}
    assert loaded.extra("never-written") == {}
    first, second = (p.name for p in plans)
    assert loaded.is_done(first) and loaded.is_done(second)
    assert not loaded.is_done("model-00003-of-00003.safetensors")
    raw = bytearray((tmp_path / first).read_bytes())
    raw[-1] ^= 1  # same size, different bytes
    (tmp_path / first).write_bytes(bytes(raw))
    assert not loaded.is_done(first)
    (tmp_path / second).write_bytes((tmp_path / second).read_bytes()[:-4])
    assert not loaded.is_done(second)
    (tmp_path / second).unlink()
    assert not loaded.is_done(second)
    (tmp_path / "nlmerge-manifest.json").write_text('{"format": "other"}')
    with pytest.raises(ValueError, match="nlmerge-manifest.json"):
        Manifest.load(tmp_path)
    (tmp_path / "nlmerge-manifest.json").write_text('{"format": "nlmerge-manifest/1", "fingerprint": "f", "shards": {}}')
    with pytest.raises(ValueError, match="nlmerge-manifest.json: .*earlier nlmerge.*; start again with --force$"):
        Manifest.load(tmp_path)
    (tmp_path / "nlmerge-manifest.json").write_text(
        '{"format": "nlmerge-manifest/2", "fingerprint": "f", "shards": {}}')
    with pytest.raises(ValueError, match="earlier nlmerge \\(no check of its contents\\); start again with --force$"):
        Manifest.load(tmp_path)
    obj = {"format": "nlmerge-manifest/3", "fingerprint": "f", "shards": {"a": {"xxh3_128": "00"}}}
    (tmp_path / "nlmerge-manifest.json").write_text(json.dumps({**obj, "check": manifest_module._check(obj)}))
    with pytest.raises(ValueError, match="unreadable resume manifest: no 'size' entry; start again with --force$"):
        Manifest.load(tmp_path)


def test_an_edited_manifest_is_refused(tmp_path):
    """A resumed job trusts the state a manifest records (a global TIES job's thresholds, sign sums
    and fills): a manifest edited by hand, or damaged, is refused naming it, whatever was changed."""
    (plan,) = plan_shards([("a", (8,), F32)], 0)
    manifest = Manifest(tmp_path, "job-fingerprint", job={"thresholds": [0.5]})
    with ShardWriter(plan, tmp_path) as w:
        w.write("a", torch.arange(8, dtype=F32))
        manifest.record(w.finish(), extra={"sign_sum": 3, "fills": {"a": 1}})
    path = tmp_path / "nlmerge-manifest.json"
    clean = path.read_text()
    assert Manifest.load(tmp_path).shards == manifest.shards
    for old, new in (('"sign_sum": 3', '"sign_sum": -3'), ('"a": 1', '"a": -1'), ("0.5", "0.25"),
                     ('"job-fingerprint"', '"job-fingerprinT"')):
        assert old in clean
        path.write_text(clean.replace(old, new))
        with pytest.raises(ValueError, match="nlmerge-manifest.json: unreadable resume manifest: its contents do not "
                                             "match its check \\(edited or damaged\\); start again with --force$"):
            Manifest.load(tmp_path)


@pytest.mark.parametrize("order", ["file", "reversed"])
def test_writer_hashes_in_file_order_without_reading_back(tmp_path, monkeypatch, order):
    g = torch.Generator().manual_seed(3)
    tensors = {"b.weight": torch.randn(33, 7, generator=g).to(torch.bfloat16), "a.bias": torch.randn(5, generator=g),
               "c.empty": torch.zeros(0), "d.weight": torch.randn(4, 4, generator=g)}
    (plan,) = plan_shards([(k, t.shape, t.dtype) for k, t in tensors.items()], 0)
    keys = plan.file_order if order == "file" else plan.file_order[::-1]
    assert [plan.entries[k].begin for k in plan.file_order] == sorted(e.begin for e in plan.entries.values())
    read_back = []
    real = writer_module.file_digest
    monkeypatch.setattr(writer_module, "file_digest", lambda path: read_back.append(path) or real(path))
    with ShardWriter(plan, tmp_path) as w:
        for key in keys:
            w.write(key, tensors[key])
        written = w.finish()
    assert written.digest == real(tmp_path / plan.name)
    assert bool(read_back) == (order == "reversed")  # in file order the hash grew as the bytes were written
    save_file(tensors, str(tmp_path / "ref.safetensors"), metadata={"format": "pt"})
    assert (tmp_path / plan.name).read_bytes() == (tmp_path / "ref.safetensors").read_bytes()


def test_writer_error_in_flight_surfaces_and_aborts(tmp_path, monkeypatch):
    tensors = {"a": torch.ones(8), "b": torch.ones(8), "c": torch.ones(8)}
    (plan,) = plan_shards([(k, t.shape, t.dtype) for k, t in tensors.items()], 0)
    real, calls = writer_module._pwrite_all, [0]

    def failing(fd, view, offset):
        calls[0] += 1
        if calls[0] == 3:  # the header, then the first tensor, then: the disk is full
            raise OSError(28, "No space left on device")
        return real(fd, view, offset)

    monkeypatch.setattr(writer_module, "_pwrite_all", failing)
    w = ShardWriter(plan, tmp_path)
    w.write(plan.file_order[0], tensors[plan.file_order[0]])
    w.write(plan.file_order[1], tensors[plan.file_order[1]])  # in flight: its error comes later
    with pytest.raises(OSError, match="No space left"):
        w.write(plan.file_order[2], tensors[plan.file_order[2]])
    assert os.listdir(tmp_path) == []  # aborted: no temporary file, nothing under the final name


def test_lock_output_names_a_broken_symlink(tmp_path):
    from nlmerge.io.writer import lock_output

    (tmp_path / "out").symlink_to(tmp_path / "missing")
    with pytest.raises(FileExistsError, match=r"'.*out' is a symbolic link to '.*missing', which does not exist"):
        with lock_output(tmp_path / "out"):
            pass
    assert os.listdir(tmp_path) == ["out"]
