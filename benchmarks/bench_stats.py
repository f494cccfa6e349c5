"""StreamingStats.update throughput: each backend vs a plain PyTorch accumulation vs the memory floor.

One batch x [M, C], y [M, D] (paired activations, the activation-matching case) per update. Timed:
``StreamingStats(C, D).update`` with each backend that runs on the device, and "plain": what one
writes by hand, a per-batch float64 ``x.T @ y`` plus float64 column sums and sums of squares
(uncentred, so not even accurate at large means), and a bare fp32 ``x.T @ y`` (the compute
floor of the Gram on this machine; +cov adds an x.T @ x that this does not count). The floor is the bytes an update must read
(x and y once) over the bandwidth of a plain copy measured in the same run. Every figure printed
is a ratio from this one run.

    python benchmarks/bench_stats.py [--rows 8192] [--features 256 1024] [--dtypes float32 bfloat16]
                                     [--device cpu|cuda] [--covariance] [--quick]
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import best_time, copy_bandwidth, machine  # noqa: E402

from nlmerge import kernels  # noqa: E402
from nlmerge.ops.stats import StreamingStats  # noqa: E402



def plain_update(acc, x, y):
    """The hand-written accumulation: float64 sums, sums of squares and x^T y of each batch."""
    xd, yd = x.double(), y.double()
    acc["sx"] += xd.sum(0)
    acc["sy"] += yd.sum(0)
    acc["sxx"] += (xd * xd).sum(0)
    acc["syy"] += (yd * yd).sum(0)
    acc["sxy"] += xd.T @ yd


def backends_for(device):
    names = ["torch"]
    if device == "cpu" and kernels.load("cpu")[0] is not None:
        names.append("cpu")
    if device == "cuda" and kernels.load("triton")[0] is not None:
        names.append("triton")
    return names


def bench_one(rows, features, dtype, device, covariance, repeat):
    c = d = features
    g = torch.Generator(device="cpu").manual_seed(0)
    x = (torch.randn(rows, c, generator=g) + 1000.0).to(dtype).to(device)
    y = (torch.randn(rows, d, generator=g) - 1000.0).to(dtype).to(device)
    nbytes = (x.numel() + y.numel()) * x.element_size()
    floor = nbytes / copy_bandwidth(max(nbytes, 1 << 26), device)
    acc = {k: torch.zeros(n, dtype=torch.float64, device=device) for k, n in (("sx", c), ("sy", d), ("sxx", c), ("syy", d))}
    acc["sxy"] = torch.zeros(c, d, dtype=torch.float64, device=device)
    plain = best_time(lambda: plain_update(acc, x, y), repeat, device)
    xf, yf = x.float(), y.float()
    gemm = best_time(lambda: xf.T @ yf, repeat, device)  # the compute floor: one bare fp32 product
    del xf, yf
    times = {}
    for name in backends_for(device):
        s = StreamingStats(c, d, covariance=covariance, backend=name)
        times[name] = best_time(lambda: s.update(x, y), repeat, device)
    label = f"M={rows} C=D={features} {str(dtype).replace('torch.', '')}{' +cov' if covariance else ''}"
    print(f"{label:<36} floor {floor * 1e3:8.2f} ms   fp32 x.T@y {gemm * 1e3:8.2f} ms   plain {plain * 1e3:8.2f} ms "
          f"({plain / floor:7.1f}x floor)")
    flops = 2.0 * rows * c * (d + (c if covariance else 0))
    for name, t in times.items():
        print(
            f"    {name:<8} {t * 1e3:9.2f} ms  {t / floor:7.1f}x floor  {plain / t:5.2f}x plain  "
            f"{times['torch'] / t:5.2f}x torch-reference  {t / gemm:5.2f}x bare fp32 x.T@y  {flops / t / 1e9:7.1f} GFLOP/s",
            flush=True,
        )
    return times, plain, floor


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=8192)
    ap.add_argument("--features", type=int, nargs="+", default=[64, 256, 1024])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--covariance", action="store_true", help="also accumulate the [C, C] covariance of x")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test)")
    args = ap.parse_args()
    if args.quick:
        args.rows, args.features, args.repeat = 512, [32], 1
    print(machine())
    print(f"device {args.device}; each row: one update() of a paired batch; floor = bytes of x and y / copy bandwidth")
    for dtype in args.dtypes:
        for f in args.features:
            bench_one(args.rows, f, getattr(torch, dtype), args.device, args.covariance, args.repeat)


if __name__ == "__main__":
    main()
