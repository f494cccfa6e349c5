"""The merge job on disk (issue 10): ``nlmerge merge`` vs the I/O floor vs ``mergekit-yaml``.

Generates a Llama-shaped base and three experts (bf16, about ``--gb`` GB each, safetensors shards
in the HF layout, with config.json), then, with the page cache warm, measures in one run:

- the floor: reading every input file once and writing an output-sized file once;
- ``nlmerge merge`` (a subprocess: its own peak anonymous memory, sampled from /proc);
- ``mergekit-yaml`` on the same config (when installed; ``--no-mergekit`` skips it), and the
  largest difference between its tensors and nlmerge's (mergekit computes in the storage dtype).

Figures are ratios (job / floor, mergekit / nlmerge) and peak memory over the largest tensor.
Usage: python benchmarks/bench_job.py [--gb 2] [--methods task_arithmetic,ties,ties_global] [--dir DIR]
       [--nproc 1,2] (process counts of nlmerge, through torchrun; the last one is compared with mergekit)
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import torch
import yaml
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.dirname(__file__))
from common import machine  # noqa: E402

NUM_EXPERTS = 3
CONFIGS = {
    "task_arithmetic": ("task_arithmetic", {"lambda": 0.5}, {"weight": 1.0}),
    "ties": ("ties", None, {"weight": 1.0, "density": 0.3}),
    "ties_global": ("ties", {"scope": "global", "convention": "ties"}, {"weight": 1.0, "density": 0.3}),
    "dare_ties": ("dare_ties", None, {"weight": 1.0, "density": 0.5}),
    # mergekit's usual dare_ties config (its README's examples): the mean divides by the raw weights
    "dare_ties_normalize": ("dare_ties", {"normalize": True, "int8_mask": True}, {"weight": 1.0, "density": 0.5}),
}


def llama_shapes(gb):
    """Names and shapes of a Llama-style model with about ``gb`` GB of bf16 parameters."""
    hidden, inter, vocab = 2048, 5632, 32000
    per_layer = 4 * hidden * hidden + 3 * hidden * inter + 2 * hidden
    layers = max(1, round((gb * 1e9 / 2 - 2 * vocab * hidden) / per_layer))
    shapes = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes += [(p + "input_layernorm.weight", (hidden,)), (p + "post_attention_layernorm.weight", (hidden,))]
        shapes += [(p + f"self_attn.{n}_proj.weight", (hidden, hidden)) for n in "qkvo"]
        shapes += [(p + "mlp.gate_proj.weight", (inter, hidden)), (p + "mlp.up_proj.weight", (inter, hidden)),
                   (p + "mlp.down_proj.weight", (hidden, inter))]
    shapes += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
              "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": 16,
              "num_key_value_heads": 16, "vocab_size": vocab, "rms_norm_eps": 1e-5, "torch_dtype": "bfloat16",
              "max_position_embeddings": 2048, "tie_word_embeddings": False}
    return shapes, config


def write_model(path, shapes, config, seed, base=None, shard_bytes=1 << 30):
    """One model in the HF layout: bf16 shards of about ``shard_bytes`` and an index."""
    os.makedirs(path, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    shard, size, files, weight_map = {}, 0, [], {}

    def flush():
        nonlocal shard, size
        name = f"model-{len(files) + 1:05d}.safetensors"
        save_file(shard, os.path.join(path, name), metadata={"format": "pt"})
        files.append(name)
        weight_map.update({k: name for k in shard})
        shard, size = {}, 0

    for key, shape in shapes:
        x = torch.randn(shape, generator=g).mul_(0.02)
        if base is not None:
            x = load_base(base, key).float().add_(x.mul_(0.05))
        shard[key] = x.to(torch.bfloat16)
        size += shard[key].numel() * 2
        if size >= shard_bytes:
            flush()
    if shard:
        flush()
    total = sum(os.path.getsize(os.path.join(path, f)) for f in files)
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)


_BASE_CACHE = {}


def load_base(path, key):
    """A tensor of the base model (its index and files opened once)."""
    from safetensors import safe_open

    if path not in _BASE_CACHE:
        _BASE_CACHE[path] = json.load(open(os.path.join(path, "model.safetensors.index.json")))["weight_map"]
    name = os.path.join(path, _BASE_CACHE[path][key])
    if name not in _BASE_CACHE:
        _BASE_CACHE[name] = safe_open(name, "pt")
    return _BASE_CACHE[name].get_tensor(key)


def read_all(paths):
    for root in paths:
        for name in sorted(os.listdir(root)):
            with open(os.path.join(root, name), "rb", buffering=0) as f:
                while f.read(1 << 24):
                    pass


def floor_seconds(inputs, out_bytes, scratch):
    """Read every input file once and write ``out_bytes`` once (page cache warm, best of 3)."""
    chunk = bytes(1 << 24)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        read_all(inputs)
        with open(scratch, "wb") as f:
            for _ in range(out_bytes // len(chunk)):
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        best = min(best, time.perf_counter() - start)
        os.remove(scratch)
    return best


def _tree_anon_bytes(root):
    """Resident anonymous (private) memory of process ``root`` and all its descendants, in bytes."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:  # status's RssAnon is a counter; smaps_rollup walks the page tables under the process's
            # mmap lock, which slowed a job mapping 8 GB of inputs by half (23 s against 15 s)
            with open(f"/proc/{pid}/status") as f:
                total += 1024 * next(int(line.split()[1]) for line in f if line.startswith("RssAnon:"))
        except (OSError, StopIteration):
            pass
    return total


def run_measured(cmd):
    """Seconds and peak anonymous (private) memory in bytes of a subprocess and its children
    (e.g. torchrun's workers, summed), sampled every 20 ms."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = [0]

    def sample():
        while proc.poll() is None:
            peak[0] = max(peak[0], _tree_anon_bytes(proc.pid))
            time.sleep(0.02)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    _, err = proc.communicate()
    seconds = time.perf_counter() - start
    thread.join()
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{err.decode()[-3000:]}")
    return seconds, peak[0]


def max_difference(a_dir, b_dir):
    def load(d):
        sd = {}
        for name in os.listdir(d):
            if name.endswith(".safetensors"):
                sd.update(load_file(os.path.join(d, name)))
        return sd

    a, b = load(a_dir), load(b_dir)
    if set(a) != set(b):
        return float("nan")
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a if a[k].numel())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=2.0, help="size of each model in GB (bf16)")
    parser.add_argument("--methods", default="task_arithmetic,ties,ties_global")
    parser.add_argument("--dir", default=None, help="working folder (default: a temporary one, removed)")
    parser.add_argument("--no-mergekit", action="store_true")
    parser.add_argument("--nproc", default="1", help="comma-separated process counts of nlmerge (torchrun for > 1)")
    args = parser.parse_args()
    work = args.dir or tempfile.mkdtemp(prefix="nlmerge-bench-job-")
    shapes, config = llama_shapes(args.gb)
    paths = [os.path.join(work, "base")] + [os.path.join(work, f"expert{i}") for i in range(NUM_EXPERTS)]
    if not os.path.exists(os.path.join(paths[-1], "config.json")):
        print(f"generating 1 + {NUM_EXPERTS} models of {sum(torch.Size(s).numel() for _, s in shapes) / 1e9:.2f}B "
              f"parameters in {work} ...", flush=True)
        write_model(paths[0], shapes, config, seed=0)
        for i, p in enumerate(paths[1:]):
            write_model(p, shapes, config, seed=i + 1, base=paths[0])
    largest = max(torch.Size(s).numel() for _, s in shapes) * 2
    out_bytes = sum(torch.Size(s).numel() for _, s in shapes) * 2
    mergekit = shutil.which("mergekit-yaml") if not args.no_mergekit else None
    print(f"# {machine()}")
    read_all(paths)  # warm the page cache
    floor = floor_seconds(paths, out_bytes, os.path.join(work, "floor.bin"))
    print(f"floor (read {len(paths)} x {out_bytes / 1e9:.2f} GB, write {out_bytes / 1e9:.2f} GB): {floor:.2f} s")
    print("| method | nlmerge / floor | peak anon memory / largest tensor (target <= "
          f"{3 * (NUM_EXPERTS + 1)}) | mergekit / nlmerge | mergekit peak / nlmerge peak | max |diff| vs mergekit |")
    print("|---|---|---|---|---|---|")
    for name in args.methods.split(","):
        method, shared, per_model = CONFIGS[name]
        cfg = {"merge_method": method, "base_model": paths[0], "dtype": "bfloat16",
               "models": [{"model": p, "parameters": dict(per_model)} for p in paths[1:]]}
        if shared:
            cfg["parameters"] = shared
        cfg_path = os.path.join(work, f"{name}.yml")
        with open(cfg_path, "w") as f:
            yaml.safe_dump(cfg, f)
        ours_dir, theirs_dir = os.path.join(work, f"out-{name}"), os.path.join(work, f"mk-{name}")
        for nproc in map(int, args.nproc.split(",")):
            launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
                       "-m", "nlmerge"] if nproc > 1 else [sys.executable, "-m", "nlmerge"])
            ours, ours_peak = run_measured(launch + ["merge", cfg_path, ours_dir, "--force", "--no-progress"])
            if nproc > 1:
                print(f"| {name}, {nproc} processes | {ours / floor:.2f} ({ours:.1f} s) | "
                      f"{ours_peak / largest:.1f} (all processes) | — | — | — |", flush=True)
        row = [name, f"{ours / floor:.2f} ({ours:.1f} s)", f"{ours_peak / largest:.1f}"]
        if mergekit and name != "ties_global":
            theirs, theirs_peak = run_measured([mergekit, cfg_path, theirs_dir, "--no-copy-tokenizer", "--quiet",
                                                "--no-write-model-card"])
            row += [f"{theirs / ours:.1f} ({theirs:.1f} s)", f"{theirs_peak / max(ours_peak, 1):.1f}",
                    f"{max_difference(ours_dir, theirs_dir):.2e}"]
            shutil.rmtree(theirs_dir, ignore_errors=True)
        else:
            row += ["—", "—", "—"]
        shutil.rmtree(ours_dir, ignore_errors=True)
        print("| " + " | ".join(row) + " |", flush=True)
    if not args.dir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
