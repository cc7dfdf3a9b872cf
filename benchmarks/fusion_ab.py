"""What ``fuse_epilogues`` alone is worth: dense, fused and unfused gated models, interleaved.

Each model is compiled twice (``fuse_epilogues`` on and off) with the deterministic shape cost
model, so both gate the same layers with the same kernels; the three candidates then run
interleaved (``ispc.benchmark.time_interleaved``: a rotating order, after warm-up) for ``--rounds``
rounds at batch 1 (or ``--batch-size``), and medians are compared (the README's A/B table)::

    python benchmarks/fusion_ab.py --models resnet18 resnet50 vgg16_bn mobilenet_v2 --rounds 40
    python benchmarks/fusion_ab.py --models resnet50 mobilenet_v2 --batch-size 32 --rounds 6
    python benchmarks/fusion_ab.py --models convnext_tiny --rounds 30   # transformers_speed's models
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import torch

import ispc
from ispc.benchmark import dense_baseline, retain_freed_memory, time_interleaved
from ispc.examples.models import create_model


def _model(name: str) -> torch.nn.Module:
    """``name`` from :mod:`ispc.examples.models`, or one of ``transformers_speed.py``'s models
    (Hugging Face ConvNeXt-T, Swin-T, ViT-S)."""
    spec = importlib.util.spec_from_file_location(
        "transformers_speed", Path(__file__).with_name("transformers_speed.py"))
    ts = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ts)
    return ts.build(name) if name in ts.MODELS else create_model(name)


def ab(name: str, *, size: int, rounds: int, keep_ratio: float,
       batch_size: int = 1) -> dict[str, float]:
    """Median ms of dense / fused / unfused for one model at ``batch_size``."""
    g = torch.Generator().manual_seed(0)
    calib = [torch.randn(8, 3, size, size, generator=g) for _ in range(4)]
    x = torch.randn(batch_size, 3, size, size, generator=g)
    torch.manual_seed(0)
    model = _model(name).eval()
    cands = {"dense": dense_baseline(model, x[:1])}
    for fuse in (True, False):
        cfg = ispc.GatingConfig(keep_ratio=keep_ratio, mode="topk", fuse_epilogues=fuse)
        cands["fused" if fuse else "unfused"] = ispc.compile(model, calib, config=cfg, progress=False)
    with torch.no_grad():
        timings = time_interleaved({k: (lambda m=m: m(x)) for k, m in cands.items()},
                                   warmup=5 if batch_size == 1 else 1,
                                   rounds=rounds, progress=False)
    return {k: t.median for k, t in timings.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["resnet18", "resnet50", "vgg16_bn", "mobilenet_v2"])
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--keep-ratio", type=float, default=0.5)
    p.add_argument("--threads", type=int)
    p.add_argument("--json")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    retain_freed_memory()
    rows = []
    for name in args.models:
        ms = ab(name, size=args.image_size, rounds=args.rounds, keep_ratio=args.keep_ratio,
                batch_size=args.batch_size)
        rows.append({"model": name, **{f"{k}_ms": v for k, v in ms.items()},
                     "fused_speedup": ms["dense"] / ms["fused"],
                     "unfused_speedup": ms["dense"] / ms["unfused"],
                     "fusion_gain": ms["unfused"] / ms["fused"]})
        r = rows[-1]
        print(f"{name}: dense {r['dense_ms']:.2f} ms, fused {r['fused_ms']:.2f} ms "
              f"({r['fused_speedup']:.2f}x), unfused {r['unfused_ms']:.2f} ms "
              f"({r['unfused_speedup']:.2f}x); fused / unfused speed {r['fusion_gain']:.3f}",
              flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": vars(args), "torch": torch.__version__,
                       "threads": torch.get_num_threads(), "results": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
