"""Cost of collecting correction statistics at every default site vs plain forward passes.

For each model, over the same batches: "plain" is ``model(batch)`` for every batch under
``torch.no_grad()``; "stats" is ``nlmerge.correct.activation_stats(model, data)`` (one pass with a
``StreamingStats`` update at every site of ``default_sites``), per ``StreamingStats`` backend. The
figure is the ratio stats / plain from this one run (target: overhead <= 10%, ratio <= 1.10);
times are the best of ``--repeat`` runs after a warm-up.

    python benchmarks/bench_correct.py [--batches 8] [--batch-size 64] [--repeat 3] [--quick]
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import best_time, machine  # noqa: E402

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
    parser.add_argument("--repeat", type=int, default=3)
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

        t_plain = best_time(plain, args.repeat)
        ratios = [best_time(lambda b=b: activation_stats(model, data, sites, backend=b), args.repeat) / t_plain
                  for b in backends]
        print(f"{name:28s} {len(sites):5d} " + " ".join(f"{r:22.3f}" for r in ratios))


if __name__ == "__main__":
    main()
