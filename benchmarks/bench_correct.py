"""Cost of collecting correction statistics at every default site vs plain forward passes.

For each model, over the same batches: "plain" is ``model(batch)`` for every batch under
``torch.no_grad()``; "stats" is ``nlmerge.correct.activation_stats(model, data)`` (one pass with a
``StreamingStats`` update at every site of ``default_sites``), per ``StreamingStats`` backend. The
figure is the ratio stats / plain from this one run (target: overhead <= 10%, ratio <= 1.10).
Per backend, after a warm-up, ``--repeat`` rounds each run plain then stats (a load that comes and
goes on the machine then hits both alike; backends are not mixed in one round: the reference's
float64 temporaries, freed, make the next run's allocations fault pages in again, +15% measured on
the ResNet); printed: the median over rounds of the round's stats / plain (robust to this VM's
swings) and, in brackets, best stats / best plain.

    python benchmarks/bench_correct.py [--batches 8] [--batch-size 64] [--repeat 9] [--quick]
"""
import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import interleaved_times, machine  # noqa: E402

from nlmerge import kernels  # noqa: E402
from nlmerge.align.models import CNN, MLP, ViT, ResNet  # noqa: E402
from nlmerge.correct import activation_stats, default_sites  # noqa: E402


def models(quick):
    """(name, model, input shape without batch) of the benchmark."""
    torch.manual_seed(0)
    out = [
        ("mlp 256-1024-1024-10", MLP((256, 1024, 1024, 10)), (256,)),
        ("cnn 32-64 @32x32", CNN(widths=(32, 64)), (3, 32, 32)),
        ("resnet 16-32 x2 @32x32", ResNet(widths=(16, 32), blocks_per_stage=2), (3, 32, 32)),
        ("vit d128 depth4 @32x32", ViT(image_size=32, patch_size=4, dim=128, depth=4, heads=4, mlp_dim=256), (3, 32, 32)),
    ]
    return out[:2] if quick else out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=9)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.batches, args.repeat = 2, 1
    print(f"# bench_correct on {machine()}")
    backends = ["torch"] + (["cpu"] if kernels.load("cpu")[0] is not None else [])
    print(f"{'model':28s} {'sites':>5s} " + " ".join(f"{'stats/plain (' + b + ')':>22s}" for b in backends))
    for name, model, shape in models(args.quick):
        model.eval()
        g = torch.Generator().manual_seed(1)
        data = [torch.randn((args.batch_size, *shape), generator=g) for _ in range(args.batches)]
        sites = default_sites(model)

        def plain():
            with torch.no_grad():
                for x in data:
                    model(x)

        cells = []
        for b in backends:
            times = interleaved_times([plain, lambda b=b: activation_stats(model, data, sites, backend=b)], args.repeat)
            best = [min(col) for col in zip(*times)]
            cells.append(f"{statistics.median(s / p for p, s in times):.3f} ({best[1] / best[0]:.3f})")
        print(f"{name:28s} {len(sites):5d} " + " ".join(f"{c:>22s}" for c in cells))


if __name__ == "__main__":
    main()
