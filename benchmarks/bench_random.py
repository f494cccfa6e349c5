"""DARE's counter-based draws (``nlmerge.ops.random``): the C++ kernel against the torch reference.

Times, per element, of ``keep_mask`` (DARE's drop decisions, bool), ``random_bits`` (int64) and
``uniform`` (float32) on the C++ backend, of ``keep_mask`` on the reference (``backend="torch"``,
on fewer elements: it is slow), and two floors from the same run: a plain fp32 copy into an
existing buffer (read + write, 8 bytes per element: what streaming a task vector once costs), timed
with the same clock, and the mask's own memory traffic (1 byte written per element at that copy's
bandwidth). Every
output is a fresh tensor, as in the merge job (its page faults count). Ratios are of this run.

    python benchmarks/bench_random.py [--count 2**24] [--ref-count 2**18] [--threads N] [--repeat 5]
                                      [--cpu-time] [--quick]
"""
import argparse

import torch

from nlmerge.ops import random as rnd
from bench_permute import best_cpu_time
from common import best_time, machine


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1 << 24, help="elements drawn by the C++ kernel")
    parser.add_argument("--ref-count", type=int, default=1 << 18, help="elements drawn by the reference")
    parser.add_argument("--threads", type=int, default=0, help="torch / OpenMP threads (0: torch's default)")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs (the fastest is kept)")
    parser.add_argument("--cpu-time", action="store_true",
                        help="time in CPU seconds of this process (use with --threads 1 on a busy machine)")
    parser.add_argument("--quick", action="store_true", help="2**20 and 2**15 elements, two repeats")
    args = parser.parse_args()
    if args.quick:
        args.count, args.ref_count, args.repeat = 1 << 20, 1 << 15, 2
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    clock = "CPU time of this process" if args.cpu_time else "wall time"
    timer = best_cpu_time if args.cpu_time else best_time
    print(f"machine: {machine()}\n{clock}; best of {args.repeat} runs\n")

    def per_element(fn, count):
        return timer(fn, args.repeat) / count * 1e9

    n, seed, name = args.count, 2024, "model.layers.0.mlp.up_proj.weight"
    src, dst = torch.ones(n), torch.empty(n)
    copy_ns = per_element(lambda: dst.copy_(src), n)  # the same clock as the draws
    rows = [
        ("keep_mask  (C++)", per_element(lambda: rnd.keep_mask(seed, name, n, 0.3, offset=7, stream=1, backend="cpu"), n)),
        ("random_bits (C++)", per_element(lambda: rnd.random_bits(seed, name, n, offset=7, stream=1, backend="cpu"), n)),
        ("uniform    (C++)", per_element(lambda: rnd.uniform(seed, name, n, offset=7, stream=1, backend="cpu"), n)),
        ("keep_mask  (torch reference)", per_element(
            lambda: rnd.keep_mask(seed, name, args.ref_count, 0.3, offset=7, stream=1, backend="torch"), args.ref_count)),
    ]
    mask_floor = copy_ns / 8  # 1 byte written per element
    print(f"{n} elements (reference: {args.ref_count}), {torch.get_num_threads()} threads")
    print(f"  fp32 copy floor            {copy_ns:8.3f} ns/element")
    print(f"  keep-mask memory floor     {mask_floor:8.3f} ns/element")
    keep = rows[0][1]
    for label, ns in rows:
        print(f"  {label:<27}{ns:8.3f} ns/element  {ns / copy_ns:8.2f}x fp32 copy  {ns / keep:8.1f}x C++ keep_mask")


if __name__ == "__main__":
    main()
