"""Batched permutation gathers (``ops.permute_tensors``) on a ResNet-18 state dict.

The state dict of a CIFAR ResNet-18 (about 11M parameters): conv weights ``[out, in, k, k]``
permuted on axes 0 and 1 (the stem conv on axis 0 only: its inputs are RGB), BN weight, bias and
running statistics on axis 0, the classifier ``[10, 512]`` on axis 1, its bias copied. Times: the
fast path (auto backend, one call for the whole state dict), the reference (``backend="torch"``:
the ``index_select`` chain), and the memory floor: every tensor read once and written once over
the bandwidth of a plain copy into an existing buffer measured in the same run, and, for scale,
a plain ``clone`` of every tensor (fresh outputs: the page faults that any out-of-place op pays).
Every figure printed is a ratio from this one run.

    python benchmarks/bench_permute.py [--dtypes float32 bfloat16] [--device cpu|cuda] [--width 64]
                                       [--repeat 3] [--rounds 5] [--threads N] [--cpu-time] [--quick]
"""
import argparse
import time

import torch

from nlmerge.ops import _dispatch
from nlmerge.ops.permute import permute_tensors
from common import best_time, copy_bandwidth, machine


def resnet18_state(width=64, num_classes=10, dtype=torch.float32, device="cpu", generator=None):
    """``(tensors, perms)``: a CIFAR ResNet-18 state dict (floats only) and one random
    permutation per layer's units, applied on the axes that Git Re-Basin would permute."""
    tensors, perms = [], []

    def perm(n):
        return torch.randperm(n, generator=generator).to(device)

    def add(shape, pairs):
        tensors.append(torch.randn(shape, generator=generator).to(dtype).to(device))
        perms.append(pairs)

    def bn(channels, p):
        for _ in range(4):  # weight, bias, running_mean, running_var
            add((channels,), [(0, p)])

    p_prev = perm(width)
    add((width, 3, 3, 3), [(0, p_prev)])
    bn(width, p_prev)
    in_ch = width
    for stage, out_ch in enumerate((width, 2 * width, 4 * width, 8 * width)):
        for block in range(2):
            p_mid, p_out = perm(out_ch), perm(out_ch)
            add((out_ch, in_ch, 3, 3), [(0, p_mid), (1, p_prev)])
            bn(out_ch, p_mid)
            add((out_ch, out_ch, 3, 3), [(0, p_out), (1, p_mid)])
            bn(out_ch, p_out)
            if stage > 0 and block == 0:  # projection shortcut
                add((out_ch, in_ch, 1, 1), [(0, p_out), (1, p_prev)])
                bn(out_ch, p_out)
            p_prev, in_ch = p_out, out_ch
    add((num_classes, in_ch), [(1, p_prev)])
    add((num_classes,), [])
    return tensors, perms


def best_cpu_time(fn, repeat=3):
    """Fastest of ``repeat`` runs after one warm-up in CPU seconds of this process (all threads):
    with ``--threads 1`` a measure that a machine shared with other jobs does not inflate."""
    fn()
    times = []
    for _ in range(repeat):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return min(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--width", type=int, default=64, help="channels of the first stage (64: ResNet-18)")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per round")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (best of each kept)")
    parser.add_argument("--threads", type=int, default=0, help="torch / OpenMP threads (0: torch's default)")
    parser.add_argument("--cpu-time", action="store_true",
                        help="time in CPU seconds of this process (use with --threads 1 on a busy machine)")
    parser.add_argument("--quick", action="store_true", help="width 16, one repeat")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    width, repeat = (16, 1) if args.quick else (args.width, args.repeat)
    if args.quick:
        args.rounds = 1
    device = args.device
    timer = best_cpu_time if args.cpu_time else (lambda fn, r: best_time(fn, r, device))
    if args.cpu_time and device != "cpu":
        parser.error("--cpu-time measures CPU work; it cannot time a GPU")
    backend, _ = _dispatch.resolve(None, torch.device(device), "benchmark")
    clock = "CPU time of this process" if args.cpu_time else "wall time"
    print(f"machine: {machine()}\nfast backend: {backend}; {clock}; best of {args.rounds} interleaved rounds\n")
    gen = torch.Generator().manual_seed(0)
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        tensors, perms = resnet18_state(width, dtype=dtype, device=device, generator=gen)
        params = sum(t.numel() for t in tensors)
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        fast_out = permute_tensors(tensors, perms)
        ref_out = permute_tensors(tensors, perms, backend="torch")
        exact = all(torch.equal(a.view(torch.int16), b.view(torch.int16)) for a, b in zip(fast_out, ref_out))
        del fast_out, ref_out
        # interleaved rounds, the best of each: a machine shared with other jobs slows some
        # rounds; the fastest round of each is the closest to an idle machine's figure
        fast = reference = clone = float("inf")
        bandwidth = 0.0
        for _ in range(args.rounds):
            bandwidth = max(bandwidth, copy_bandwidth(nbytes, device, repeat))
            fast = min(fast, timer(lambda: permute_tensors(tensors, perms), repeat))
            reference = min(reference, timer(lambda: permute_tensors(tensors, perms, backend="torch"), repeat))
            clone = min(clone, timer(lambda: [t.clone() for t in tensors], repeat))
        floor = 2 * nbytes / bandwidth
        print(f"ResNet-18 (width {width}), {len(tensors)} tensors, {params / 1e6:.1f}M params, {dtype_name}: "
              f"copy bandwidth {bandwidth / 1e9:.1f} GB/s, floor {floor * 1e3:.2f} ms (read + write once); "
              f"fast == reference: {exact}")
        print(f"  fast ({backend:<6})  {fast * 1e3:8.2f} ms  {fast / floor:6.2f}x floor  "
              f"| reference {reference / fast:5.2f}x slower")
        print(f"  reference (torch) {reference * 1e3:8.2f} ms  {reference / floor:6.2f}x floor")
        print(f"  plain clone       {clone * 1e3:8.2f} ms  {clone / floor:6.2f}x floor  "
              f"(every tensor copied into a fresh output: what allocation + page faults add to the floor)\n",
              flush=True)
        del tensors, perms


if __name__ == "__main__":
    main()
