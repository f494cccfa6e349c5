"""The merge job over several torch.distributed processes (gloo on this machine's CPU): the output
is byte-identical to one process's, whatever the number of processes; a failed or killed rank
fails the whole job, and --resume then gives the same bytes."""
import datetime
import json
import os
import subprocess
import sys
import time

import pytest
import torch

pytest.importorskip("safetensors")
pytest.importorskip("yaml")
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from nlmerge.jobs import run_merge  # noqa: E402
from nlmerge.jobs.distributed import World  # noqa: E402

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")
NUM_EXPERTS = 3
SHARD = "2K"  # about ten output shards: every rank gets several


def _llm_tensors(generator, layers=3, hidden=16, vocab=40):
    """Random tensors with a decoder's names and shapes (embeddings, per-layer attention and MLP,
    norms, head), some of them with zero signs' ties to exercise the TIES majority rule."""
    sd = {"model.embed_tokens.weight": torch.randn(vocab, hidden, generator=generator)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for name, shape in (("self_attn.q_proj", (hidden, hidden)), ("self_attn.k_proj", (hidden // 2, hidden)),
                            ("self_attn.v_proj", (hidden // 2, hidden)), ("self_attn.o_proj", (hidden, hidden)),
                            ("mlp.gate_proj", (24, hidden)), ("mlp.up_proj", (24, hidden)),
                            ("mlp.down_proj", (hidden, 24))):
            sd[p + name + ".weight"] = torch.randn(shape, generator=generator)
        sd[p + "input_layernorm.weight"] = torch.ones(hidden)
    sd["model.norm.weight"] = torch.ones(hidden)
    sd["lm_head.weight"] = torch.randn(vocab, hidden, generator=generator)
    return sd


def _save_sharded(folder, sd, per_shard=9):
    os.makedirs(folder)
    keys = list(sd)
    groups = [keys[i:i + per_shard] for i in range(0, len(keys), per_shard)]
    weight_map = {}
    for n, group in enumerate(groups):
        name = f"model-{n + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file({k: sd[k].contiguous() for k in group}, os.path.join(folder, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in group})
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"model_type": "llama", "num_hidden_layers": 3, "torch_dtype": "bfloat16"}, f)


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """A bf16 base and three experts (the base plus noise), whose final norms are the base's, +0.25
    and -0.25 with equal weights: elected signs of exactly zero, filled by the model-wide majority."""
    root = tmp_path_factory.mktemp("dist")
    g = torch.Generator().manual_seed(0)
    base = _llm_tensors(g)
    _save_sharded(root / "base", {k: v.to(torch.bfloat16) for k, v in base.items()})
    paths = [str(root / "base")]
    for i in range(NUM_EXPERTS):
        sd = {k: (v + 0.1 * torch.randn(v.shape, generator=g)).to(torch.bfloat16) for k, v in base.items()}
        sd["model.norm.weight"] = (base["model.norm.weight"] + (0.0, 0.25, -0.25)[i]).to(torch.bfloat16)
        _save_sharded(root / f"e{i}", sd)
        paths.append(str(root / f"e{i}"))
    return paths


def _config(paths, method, shared=None, per_model=None):
    per_model = per_model or [{"weight": 1.0, "density": 0.4}, {"weight": 0.8, "density": 0.5},
                              {"weight": 0.8, "density": 0.6}]
    return {"merge_method": method, "base_model": paths[0], "parameters": shared or {},
            "models": [{"model": p, "parameters": per_model[i]} for i, p in enumerate(paths[1:])]}


def _worker(rank, size, init_file, cfg, out, options, die_after):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=size,
                            timeout=datetime.timedelta(seconds=60))
    try:
        if die_after and rank == size - 1:
            from nlmerge.io import writer

            real_write, calls = writer.ShardWriter.write, [0]

            def dying_write(self, key, tensor, **options):
                calls[0] += 1
                if calls[0] == die_after[0]:
                    if die_after[1] == "kill":
                        # the steps done so far finish (hash, rename) on the job's finisher thread: let
                        # it catch up on a loaded machine, so that the kill leaves finished shards
                        time.sleep(2)
                        os._exit(3)  # a killed process: no Python clean-up, no message to the others
                    raise ValueError(f"disk full while writing {key}")
                return real_write(self, key, tensor, **options)

            writer.ShardWriter.write = dying_write
        run_merge(cfg, out, progress=False, out_shard_size=SHARD, **options)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _run_ranks(tmp_path, size, cfg, out, die_after=None, **options):
    init = tmp_path / f"init-{os.path.basename(out)}-{size}-{len(os.listdir(tmp_path))}"
    mp.start_processes(_worker, args=(size, str(init), cfg, str(out), options, die_after), nprocs=size,
                       join=True, start_method="spawn")


def _files(out):
    """Every output file's bytes but the manifest's, by path relative to ``out``."""
    found = {}
    for folder, _, names in os.walk(out):
        for name in names:
            if name != "nlmerge-manifest.json":
                path = os.path.join(folder, name)
                found[os.path.relpath(path, out)] = open(path, "rb").read()
    return found


def _manifest(out):
    with open(os.path.join(out, "nlmerge-manifest.json")) as f:
        return json.load(f)


def test_share_is_contiguous_by_bytes():
    sizes = [10, 10, 10, 70, 0, 5, 5]
    shares = [World(r, 3).share(sizes) for r in range(3)]
    assert sorted(i for s in shares for i in s) == list(range(len(sizes)))
    for s in shares:
        assert s == list(range(s[0], s[-1] + 1)) if s else True
    assert shares == [[0, 1, 2], [3], [4, 5, 6]]  # the 70-byte shard's middle byte is in rank 1's third
    assert World(0, 1).share(sizes) == list(range(7)) and World(1, 2).share([0, 0]) == []


@pytest.mark.parametrize("method, shared, size", [
    ("ties", {"scope": "global", "convention": "ties"}, 2),
    ("ties", {"scope": "global", "convention": "ties", "normalize": False}, 3),
    ("dare_ties", {"lambda": 0.7}, 2),
    ("tall", {"mtl": "ties"}, 3),
])
def test_many_processes_write_the_same_bytes_as_one(family, tmp_path, method, shared, size):
    cfg = _config(family, method, shared)
    run_merge(cfg, tmp_path / "one", progress=False, out_shard_size=SHARD, random_seed=5)
    _run_ranks(tmp_path, size, cfg, tmp_path / "many", random_seed=5)
    one, many = _files(tmp_path / "one"), _files(tmp_path / "many")
    assert sum(name.endswith(".safetensors") for name in one) >= 6
    if method == "ties":  # the zero signs took the majority's fill, which the ranks learn only at the end
        norm = load_file(tmp_path / "one" / json.loads(one["model.safetensors.index.json"])["weight_map"][
            "model.norm.weight"])["model.norm.weight"].float()
        (shift,) = (norm - 1.0).abs().unique().tolist()
        assert shift > 0.1
    assert sorted(one) == sorted(many)
    for name in one:
        assert one[name] == many[name], name
    manifest = json.load(open(tmp_path / "many" / "nlmerge-manifest.json"))
    assert sorted(manifest["shards"]) == sorted(n for n in one if n.endswith(".safetensors"))


def test_a_failed_rank_fails_the_job_and_resume_gives_the_same_bytes(family, tmp_path):
    cfg = _config(family, "ties", {"scope": "global", "convention": "ties"})
    run_merge(cfg, tmp_path / "one", progress=False, out_shard_size=SHARD)
    with pytest.raises(mp.ProcessRaisedException, match=r"disk full|failed on rank 1 of 2: ValueError: disk full"):
        _run_ranks(tmp_path, 2, cfg, tmp_path / "failed", die_after=(3, "raise"))
    assert not [n for n in _files(tmp_path / "failed") if n.endswith(".partial")]
    assert not (tmp_path / "failed" / "model.safetensors.index.json").exists()
    _run_ranks(tmp_path, 2, cfg, tmp_path / "failed", resume=True)
    assert _files(tmp_path / "one") == _files(tmp_path / "failed")
    assert _manifest(tmp_path / "one") == _manifest(tmp_path / "failed")  # what a later --resume verifies

    # weights under which bf16 task vectors never cancel exactly: only the planted norm is filled with
    # the running majority sign (and merged again if the model's majority overturns it)
    cfg = _config(family, "ties", {"scope": "global", "convention": "ties"},
                  [{"weight": 1.0, "density": 0.4}, {"weight": 0.8, "density": 0.5}, {"weight": 0.7, "density": 0.6}])
    run_merge(cfg, tmp_path / "one", progress=False, out_shard_size=SHARD, force=True)
    with pytest.raises(mp.ProcessExitedException):
        _run_ranks(tmp_path, 2, cfg, tmp_path / "killed", die_after=(8, "kill"))
    done = [n for n in os.listdir(tmp_path / "killed") if n.startswith("model-")]
    assert done, "the killed rank should have finished shards before its 8th write"
    _run_ranks(tmp_path, 3, cfg, tmp_path / "killed", resume=True)  # resumed on another process count
    assert _files(tmp_path / "one") == _files(tmp_path / "killed")
    assert _manifest(tmp_path / "one") == _manifest(tmp_path / "killed")
    assert not [n for n in os.listdir(tmp_path / "killed") if n.startswith("nlmerge-manifest.rank")]


def test_torchrun_command_line(family, tmp_path):
    cfg = tmp_path / "cfg.yml"
    cfg.write_text(json.dumps(_config(family, "task_arithmetic", {"lambda": 0.5})))  # JSON is YAML
    run_merge(str(cfg), tmp_path / "one", progress=False, out_shard_size=SHARD)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "nlmerge", "merge", str(cfg), str(tmp_path / "many"), "--out-shard-size", SHARD,
                           "--no-progress"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert _files(tmp_path / "one") == _files(tmp_path / "many")


def test_sigterm_ends_a_worker_whose_torchrun_is_gone(family, tmp_path):
    """A worker started for a torchrun that is gone waits in the rendezvous (C++, where the
    command's Python SIGTERM handler never runs): SIGTERM must still end it, not wait for the
    rendezvous's timeout (30 minutes). Here rank 0's store is a socket that accepts the worker's
    connection and never answers."""
    import signal
    import socket

    cfg = tmp_path / "cfg.yml"
    cfg.write_text(json.dumps(_config(family, "task_arithmetic", {"lambda": 0.5})))
    with socket.socket() as store:
        store.bind(("127.0.0.1", 0))
        store.listen()
        store.settimeout(120)
        env = {**os.environ, "WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(store.getsockname()[1])}
        worker = subprocess.Popen([sys.executable, "-m", "nlmerge", "merge", str(cfg), str(tmp_path / "out"),
                                   "--no-progress"], env=env, stderr=subprocess.PIPE, text=True)
        try:
            connection, _ = store.accept()  # the worker is in the rendezvous
            with connection:
                time.sleep(1)
                assert worker.poll() is None, worker.stderr.read()
                worker.send_signal(signal.SIGTERM)
                assert worker.wait(timeout=20) == -signal.SIGTERM
        finally:
            worker.kill()
    assert not (tmp_path / "out").exists()
