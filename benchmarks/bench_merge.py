"""Merge kernels vs the reference vs a FusionBench-style implementation vs the memory floor.

For T task vectors of N parameters: global TIES (one threshold per task over the task vector,
then the merge) — fused (``nlmerge.ops``, auto backend), the reference (``backend="torch"``), and
the FusionBench/original-TIES way (flatten, ``kthvalue``, masked tensor ops) — plus task
arithmetic and TALL masks. The floor is the bytes an op must move (read the T task vectors once,
write the output once) over the bandwidth of a plain copy measured in the same run. Every figure
printed is a ratio from this one run.

The models rows (``--models``) take the base and T experts in their storage dtype (the
``*_models`` ops form the task vectors in the kernel): global TIES at the op level (thresholds
from the models' histograms, then the merge pass), the same through ``nlmerge.merge.ties`` on a
dict of 1024 x 1024 tensors, task arithmetic; their floor reads T + 1 inputs and writes one output.
Their data leans to a TIES majority sign (``--majority``: +1 and -1 by default, 0 symmetric).
With ``--device cuda`` (the Triton kernels) they add TALL masks and consensus from the models, the
share of the card's copy bandwidth each op reaches (issue 13's targets: >= 80% for the merge pass,
>= 70% for selection) and the peak extra memory.

The DARE rows (``--dare``) run mergekit's ``dare_linear`` and ``dare_ties`` (rescale on, density
``--density``) on one tensor of the models through ``nlmerge.merge.merge_tensor``: the fused path
(norms pass + merge pass over the models) against the unfused one it replaced (fp32 task vectors,
a keep mask per task, masking, two fp32 L1 norms per task, then the stacked-task-vector kernel),
over the same floor.

The selection rows (``--selection``): one task's exact threshold, the one-read path (sample,
bracket, one counting pass; ``ops.magnitude_threshold*``) against the two histogram passes
(``MagnitudeSelector``'s fallback protocol), from a task vector (fp32) and from the models (base
and expert in the dtype); the floor reads the inputs once. Times interleaved, best of the rounds.

    python benchmarks/bench_merge.py [--sizes 24 26] [--tasks 4] [--dtypes float32 bfloat16]
                                     [--device cpu|cuda] [--quick] [--models [--majority 1 -1 0]] [--dare]
                                     [--selection]
"""
import argparse
import os
import subprocess
import sys

import torch

from nlmerge import merge, ops
from nlmerge.merge import METHODS as MERGEKIT_METHODS
from nlmerge.merge import merge_tensor
from nlmerge.ops import _dispatch, selection
from common import best_time, copy_bandwidth, interleaved_times, machine, peak_extra_bytes


def fusionbench_ties(tv, keep):
    """TIES as FusionBench and the original TIES code write it: kthvalue on the flattened rows."""
    d = tv.shape[1]
    k = d - int(d * keep)
    magnitudes = tv.abs()
    kth = magnitudes.float().kthvalue(k, dim=1, keepdim=True).values.to(tv.dtype)
    trimmed = tv * (magnitudes >= kth)
    signs = torch.sign(trimmed.sum(dim=0))
    signs[signs == 0] = torch.sign(signs.sum())
    selected = trimmed * torch.where(signs > 0, trimmed > 0, trimmed < 0)
    counts = (selected != 0).sum(dim=0).to(tv.dtype)
    return selected.sum(dim=0) / counts.clamp(min=1)


def nlmerge_ties(tv, keep, backend=None):
    thresholds = [ops.magnitude_threshold(tau, keep, backend=backend) for tau in tv]
    return ops.ties_merge(tv, thresholds, backend=backend)


def nlmerge_ties_models(base, experts, keep, backend=None):
    """Global TIES over one tensor from the models: every task's threshold in one read of the
    models, then the merge pass with the zero-sign rule (no fp32 task vector is stored)."""
    thresholds = ops.magnitude_thresholds_models(base, experts, keep, backend=backend)
    return ops.ties_merge_models(base, experts, thresholds=thresholds, backend=backend)


def unfused_dare(base, experts, density, consensus, name="w", seed=0):
    """DARE with rescale as nlmerge ran it before the fused path: the fp32 task vectors stacked,
    per task a keep mask, masked in place, fp32 L1 norms before and after, then the stacked kernel
    (task arithmetic, or TIES with mergekit's consensus: zero thresholds, + for zero signs)."""
    taus = torch.stack([x.float() - base.float() for x in experts])
    weights = []
    for t, tau in enumerate(taus):
        kept = ops.keep_mask(seed, name, tau.shape, density, stream=t, device=tau.device)
        before = torch.linalg.vector_norm(tau, 1)
        tau.masked_fill_(~kept, 0.0)
        weights.append(float(before / torch.linalg.vector_norm(tau, 1)))
    if consensus is None:
        return ops.task_arithmetic(taus, weights=weights, base=base)
    return ops.ties_merge(taus, [0.0] * len(experts), sign="mass", disjoint="sum", weights=weights, base=base,
                          zero_sign="positive")


def make_models(tasks, n, dtype, gen, device="cpu", majority=0):
    """A base and T experts near it (task vectors small next to the weights); with ``majority`` +1
    or -1 the task vectors lean that way (mean 0.05 of their spread), so TIES's elected signs have
    that majority clearly; with 0 they are symmetric and the majority is a coin's toss."""
    base = torch.randn(n, generator=gen)
    experts = [(base + 0.01 * (torch.randn(n, generator=gen) + 0.05 * majority)).to(dtype).to(device)
               for _ in range(tasks)]
    return base.to(dtype).to(device), experts


def state_dict(x, rows=1024):
    """A flat tensor as a dict of ``rows x rows`` model-shaped tensors (views)."""
    chunk = rows * rows
    return {f"layer{i}.weight": x[i * chunk:(i + 1) * chunk].view(rows, rows) for i in range(x.numel() // chunk)}


METHODS = {"fused": nlmerge_ties, "fusionbench": fusionbench_ties, "models": None}


def peak_in_fresh_process(method, log2n, tasks, dtype_name, keep, majority=0):
    """Peak extra memory of one TIES run on the CPU, measured in a new process so that memory the
    allocator cached earlier in this run cannot hide it (glibc told to return every large block)."""
    command = [sys.executable, __file__, "--peak-of", method, "--sizes", str(log2n), "--tasks", str(tasks),
               "--dtypes", dtype_name, "--keep", str(keep), "--majority", str(majority)]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return int(result.stdout.split()[-1])


def row(name, seconds, floor, others=()):
    cells = [f"{name:<34}", f"{seconds * 1e3:10.1f} ms", f"{seconds / floor:8.2f}x floor"]
    cells += [f"{label} {other / seconds:7.1f}x" for label, other in others]
    print("  ".join(cells), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[24, 26], help="log2 of N")
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--keep", type=float, default=0.2)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="N = 2^20 only, one repeat")
    parser.add_argument("--models", action="store_true", help="only the rows that take the models")
    parser.add_argument("--majority", type=int, nargs="+", default=[1, -1], choices=[-1, 0, 1],
                        help="--models: the TIES majority sign of the data (0: symmetric, a coin's toss)")
    parser.add_argument("--dare", action="store_true", help="only the DARE rows (dare_linear, dare_ties)")
    parser.add_argument("--density", type=float, default=0.3, help="DARE's density (--dare)")
    parser.add_argument("--selection", action="store_true", help="only the selection rows (one read vs two passes)")
    parser.add_argument("--peak-of", choices=sorted(METHODS), help=argparse.SUPPRESS)  # internal: one measurement
    args = parser.parse_args()
    if args.peak_of:
        dtype = getattr(torch, args.dtypes[0])
        if args.peak_of == "models":
            base, experts = make_models(args.tasks, 1 << args.sizes[0], dtype, torch.Generator().manual_seed(0),
                                        majority=args.majority[0])
            run = lambda: nlmerge_ties_models(base, experts, args.keep)  # noqa: E731
        else:
            tv = torch.randn(args.tasks, 1 << args.sizes[0]).to(dtype)
            run = lambda: METHODS[args.peak_of](tv, args.keep)  # noqa: E731
        run()  # warm-up: loads the extension, starts the threads
        print(peak_extra_bytes(run))
        return
    sizes, repeat = ([20], 1) if args.quick else (args.sizes, 3)
    device = args.device
    backend, _ = _dispatch.resolve(None, torch.device(device), "benchmark")
    print(f"machine: {machine()}\nfused backend: {backend}; T = {args.tasks}, keep = {args.keep}\n")
    gen = torch.Generator().manual_seed(0)
    if args.selection:
        for log2n in sizes:
            for dtype_name in args.dtypes:
                selection_rows(log2n, getattr(torch, dtype_name), args, repeat, device, gen)
        return
    if args.dare:
        for log2n in sizes:
            for dtype_name in args.dtypes:
                dare_rows(log2n, getattr(torch, dtype_name), args, repeat, device, gen)
        return
    if args.models:
        for log2n in sizes:
            for dtype_name in args.dtypes:
                for majority in args.majority:
                    models_rows(log2n, getattr(torch, dtype_name), args, repeat, device, gen, majority)
        return
    for log2n in sizes:
        for dtype_name in args.dtypes:
            dtype = getattr(torch, dtype_name)
            n, t = 1 << log2n, args.tasks
            tv = torch.randn(t, n, generator=gen).to(dtype).to(device)
            size = tv.element_size()
            bandwidth = copy_bandwidth(t * n * size, device)
            floor = (t * n + n) * size / bandwidth
            print(f"N = 2^{log2n}, {dtype_name}: copy bandwidth {bandwidth / 1e9:.1f} GB/s, "
                  f"floor {floor * 1e3:.1f} ms (read {t}xN, write N)")
            fused = best_time(lambda: nlmerge_ties(tv, args.keep), repeat, device)
            reference = best_time(lambda: nlmerge_ties(tv, args.keep, "torch"), max(1, repeat - 2), device)
            fusionbench = best_time(lambda: fusionbench_ties(tv, args.keep), max(1, repeat - 2), device)
            row("TIES global (threshold + merge)", fused, floor, [("| reference", reference), ("| FusionBench-style", fusionbench)])
            row("  reference (torch)", reference, floor)
            row("  FusionBench-style", fusionbench, floor)
            if device == "cuda":
                fused_peak = peak_extra_bytes(lambda: nlmerge_ties(tv, args.keep), device)
                fusionbench_peak = peak_extra_bytes(lambda: fusionbench_ties(tv, args.keep), device)
            else:
                fused_peak, fusionbench_peak = (
                    peak_in_fresh_process(m, log2n, t, dtype_name, args.keep) for m in ("fused", "fusionbench")
                )
            print(f"  peak extra memory: fused TIES {fused_peak / 2**20:.1f} MiB, FusionBench-style "
                  f"{fusionbench_peak / 2**20:.1f} MiB (one output: {n * size / 2**20:.1f} MiB)")
            selection = best_time(lambda: [ops.magnitude_threshold(tau, args.keep) for tau in tv], repeat, device)
            row("  threshold only (T tasks)", selection, t * n * size / bandwidth)
            thresholds = [ops.magnitude_threshold(tau, args.keep) for tau in tv]
            merge = best_time(lambda: ops.ties_merge(tv, thresholds), repeat, device)
            row("  merge pass only", merge, floor)
            ta = best_time(lambda: ops.task_arithmetic(tv), repeat, device)
            ta_ref = best_time(lambda: ops.task_arithmetic(tv, backend="torch"), max(1, repeat - 2), device)
            row("task arithmetic", ta, floor, [("| reference", ta_ref), ("| torch sum", best_time(lambda: tv.sum(dim=0), repeat, device))])
            mtl = ops.task_arithmetic(tv)
            tall_floor = (t * n + n) * size / bandwidth + t * n / 8 / bandwidth
            tall = best_time(lambda: ops.tall_masks(tv, mtl, 0.4), repeat, device)
            tall_ref = best_time(lambda: ops.tall_masks(tv, mtl, 0.4, backend="torch"), max(1, repeat - 2), device)
            row("TALL masks (bit-packed)", tall, tall_floor, [("| reference", tall_ref)])
            print()
            del tv, mtl


def two_pass_threshold(keep, device, x=None, models=None):
    """The exact threshold by the two histogram passes (the one-read path's fallback)."""
    sel = ops.MagnitudeSelector(device)
    if x is not None:
        sel.count(x)
    else:
        sel.count_models(*models)
    d = sel.total
    sel.locate(d - int(d * keep))
    if x is not None:
        sel.count_low(x)
    else:
        sel.count_low_models(*models)
    return sel.threshold()


def selection_rows(log2n, dtype, args, repeat, device, gen):
    """One task's threshold: one read vs two passes vs the floor (reading the inputs once)."""
    n = 1 << log2n
    base, (expert,) = make_models(1, n, dtype, gen, device)
    bandwidth = copy_bandwidth(2 * n * base.element_size(), device)
    print(f"N = 2^{log2n}, {dtype}: copy bandwidth {bandwidth / 1e9:.1f} GB/s")
    cases = [("threshold from models", 2 * n * base.element_size(), lambda: ops.magnitude_threshold_models(base, expert, args.keep),
              lambda: two_pass_threshold(args.keep, device, models=(base, expert)))]
    if dtype == torch.float32:
        tau = expert - base
        cases.append(("threshold of fp32 tau", n * 4, lambda: ops.magnitude_threshold(tau, args.keep),
                      lambda: two_pass_threshold(args.keep, device, x=tau)))
    selection.ONE_READ_MIN_ELEMENTS = 1  # the one-read path at every size here (the ops take it from 2^25)
    for name, nbytes, one, two in cases:
        assert torch.equal(one(), two())
        times = interleaved_times([one, two], repeat, device)
        fast, slow = (min(r[i] for r in times) for i in (0, 1))
        row(f"  {name}: one read", fast, nbytes / bandwidth, [("| two passes", slow)])
        row(f"  {name}: two passes", slow, nbytes / bandwidth)
    print()


def models_rows(log2n, dtype, args, repeat, device, gen, majority):
    """The rows of the ops that take the models (base + T experts in their storage dtype), on data
    of the given TIES ``majority`` sign (``make_models``)."""
    n, t = 1 << log2n, args.tasks
    base, experts = make_models(t, n, dtype, gen, device, majority)
    size = base.element_size()
    bandwidth = copy_bandwidth(t * n * size, device)
    floor = (t + 1) * n * size / bandwidth
    print(f"N = 2^{log2n}, {dtype} models, majority {majority:+d}: copy bandwidth {bandwidth / 1e9:.1f} GB/s, "
          f"floor {floor * 1e3:.1f} ms (read {t + 1}xN, write N)")
    fused = best_time(lambda: nlmerge_ties_models(base, experts, args.keep), repeat, device)
    tv = torch.stack([x.float() - base.float() for x in experts])
    fusionbench = best_time(lambda: fusionbench_ties(tv, args.keep), 1, device)
    stacked = best_time(lambda: nlmerge_ties(torch.stack([x.float() - base.float() for x in experts]), args.keep),
                        repeat, device)
    del tv
    row("TIES global from models", fused, floor, [("| fp32 task vectors + fused", stacked),
                                                 ("| FusionBench-style", fusionbench)])
    thresholds = ops.magnitude_thresholds_models(base, experts, args.keep)
    selection = best_time(lambda: ops.magnitude_thresholds_models(base, experts, args.keep), repeat, device)
    per_task = best_time(lambda: [ops.magnitude_threshold_models(base, x, args.keep) for x in experts], repeat, device)
    row("  thresholds only (T tasks, one read)", selection, floor, [("| task by task", per_task)])
    merge_pass = best_time(lambda: ops.ties_merge_models(base, experts, thresholds=thresholds), repeat, device)
    row("  merge pass only", merge_pass, floor)
    base_sd, expert_sds = state_dict(base), [state_dict(x) for x in experts]
    api = best_time(lambda: merge.ties(base_sd, expert_sds, keep=args.keep, scope="global"), repeat, device)
    row("  nlmerge.merge.ties (1024^2 tensors)", api, floor, [("| op-level / API", fused)])
    ta = best_time(lambda: ops.task_arithmetic_models(base, experts), repeat, device)
    row("task arithmetic from models", ta, floor)
    if device == "cpu":
        peak = peak_in_fresh_process("models", log2n, t, str(dtype).split(".")[-1], args.keep, majority)
        print(f"  peak extra memory: TIES from models {peak / 2**20:.1f} MiB (one output: {n * size / 2**20:.1f} MiB)")
    else:
        gpu_models_rows(base, experts, args, repeat, bandwidth, {"merge pass": merge_pass, "thresholds": selection})
    print()


def gpu_models_rows(base, experts, args, repeat, bandwidth, measured):
    """The card's rows of the models ops (Triton): TALL masks, consensus, peak extra memory, and the
    share of the copy bandwidth of these and of the ``measured`` ones: the bytes each must move
    (the thresholds: one read of the base and the T experts) over its time."""
    t, n, size = len(experts), base.numel(), base.element_size()
    inputs = (t + 1) * n * size
    mtl = ops.task_arithmetic_models(base, experts, include_base=False, out_dtype=torch.float32)
    moved = {"merge pass": inputs + n * size, "thresholds": inputs}
    measured["TALL masks"] = best_time(lambda: ops.tall_masks_models(base, experts, mtl, 0.4), repeat, "cuda")
    moved["TALL masks"] = inputs + 4 * n + t * n / 8
    measured["consensus"] = best_time(lambda: ops.consensus_merge_models(base, experts, mtl, 0.4), repeat, "cuda")
    moved["consensus"] = inputs + 4 * n + n * size
    measured["task arithmetic"] = best_time(lambda: ops.task_arithmetic_models(base, experts), repeat, "cuda")
    moved["task arithmetic"] = inputs + n * size
    for name in ("TALL masks", "consensus"):
        row(f"{name} from models", measured[name], moved[name] / bandwidth)
    print("  share of the copy bandwidth: " + ", ".join(
        f"{name} {moved[name] / bandwidth / seconds:.0%}" for name, seconds in measured.items()))
    peak = peak_extra_bytes(lambda: nlmerge_ties_models(base, experts, args.keep), "cuda")
    print(f"  peak extra memory: TIES from models {peak / 2**20:.1f} MiB (one output: {n * size / 2**20:.1f} MiB)")


def dare_rows(log2n, dtype, args, repeat, device, gen):
    """dare_linear and dare_ties on one tensor of the models: fused vs unfused vs the floor."""
    n, t = 1 << log2n, args.tasks
    base, experts = make_models(t, n, dtype, gen, device)
    size = base.element_size()
    bandwidth = copy_bandwidth(t * n * size, device)
    floor = (t + 1) * n * size / bandwidth
    print(f"N = 2^{log2n}, {dtype} models, density {args.density}: copy bandwidth {bandwidth / 1e9:.1f} GB/s, "
          f"floor {floor * 1e3:.1f} ms (read {t + 1}xN, write N)")
    keep = ops.RandomKeep(0, "w", (args.density,) * t)
    for method in ("dare_linear", "dare_ties"):
        kwargs = MERGEKIT_METHODS[method].kwargs({"weight": 1.0, "density": args.density})
        fused = best_time(lambda: merge_tensor(base, experts, **kwargs, name="w", out_dtype=dtype), repeat, device)
        unfused = best_time(lambda: unfused_dare(base, experts, args.density, kwargs["consensus"]),
                            max(1, repeat - 1), device)
        row(f"{method} (rescale) from models", fused, floor, [("| unfused", unfused)])
        row("  unfused (fp32 task vectors)", unfused, floor)
    norms = best_time(lambda: ops.keep_l1_norms_models(base, experts, keep), repeat, device)
    row("  norms pass only (T tasks)", norms, t * n * size / bandwidth * (t + 1) / t)
    merge_pass = best_time(lambda: ops.task_arithmetic_models(base, experts, random_keep=keep), repeat, device)
    row("  dare_linear merge pass only", merge_pass, floor)
    print()


if __name__ == "__main__":
    main()
