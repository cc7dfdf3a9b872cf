"""Gated linear layers at ImageNet size: ConvNeXt-T, Swin-T and ViT-S (Hugging Face definitions,
full-size configs, random weights, no download) compiled by ispc against their dense selves.

Each model is captured with torch.export, compiled at ``--keep-ratio`` (top-k, latency-aware at
batch 1 by default: layers whose gating does not pay stay dense) and timed against the same graph
dense (``ispc.benchmark.benchmark``: interleaved, medians, several distinct input batches), with
the MAC ratio the gates execute beside the measured one. It also says how many of the model's
linear layers over token/pixel channels (ConvNeXt's pointwise layers, the transformers' MLPs) are
gated, and for those left dense, why (the report's reason, with the measured times)::

    cpulock python benchmarks/transformers_speed.py --models convnext_tiny swin_tiny vit_small \\
        --threads 2 --json results.json

``--runtimes onnxruntime`` (names of :data:`ispc.runtimes.DENSE_RUNTIMES`) also times the dense
model in those runtimes and the compiled model saved and loaded, each in processes of its own
(:func:`ispc.runtimes.time_runtimes`): ispc against the fastest dense runtime, not only against
its own dense graph.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings

import torch

import ispc
from ispc.benchmark import (benchmark, dense_baseline, input_batches, layer_breakdown,
                            results_table, retain_freed_memory)
from ispc.runtimes import DENSE_RUNTIMES, machine_info, runtimes_table, time_runtimes

MODELS = ("convnext_tiny", "swin_tiny", "vit_small")


def build(name: str) -> torch.nn.Module:
    """The model at its published size (random weights)."""
    import transformers as T

    torch.manual_seed(0)
    if name == "convnext_tiny":
        cfg = T.ConvNextConfig(hidden_sizes=[96, 192, 384, 768], depths=[3, 3, 9, 3])
        return T.ConvNextForImageClassification(cfg).eval()
    if name == "swin_tiny":
        cfg = T.SwinConfig(image_size=224, patch_size=4, embed_dim=96, depths=[2, 2, 6, 2],
                           num_heads=[3, 6, 12, 24], window_size=7)
        return T.SwinForImageClassification(cfg).eval()
    if name == "vit_small":
        cfg = T.ViTConfig(image_size=224, patch_size=16, hidden_size=384, num_hidden_layers=12,
                          num_attention_heads=6, intermediate_size=1536)
        return T.ViTForImageClassification(cfg).eval()
    raise SystemExit(f"unknown model {name!r}; one of {', '.join(MODELS)}")


def mlp_summary(report: ispc.Report) -> dict:
    """The linear layers over channels (op 'linear' with a site): gated, and why not."""
    rows = [r for r in report.layers if r.op == "linear" and r.name != "classifier"]
    dense = [r for r in rows if not r.gated]
    return {"linear_layers": len(rows), "gated": len(rows) - len(dense),
            "dense_reasons": sorted({r.reason for r in dense if r.reason})[:6]}


def per_layer(dense: torch.nn.Module, compiled: ispc.CompiledModel, x: torch.Tensor,
              report: ispc.Report) -> dict:
    """Where the time goes: the gated layers' dense and gated medians, the layers left dense, and
    what runs outside conv/linear layers (norms, activations, layout copies), from
    :func:`ispc.benchmark.layer_breakdown` (20 hooked whole-model runs each)."""
    b = layer_breakdown(dense, compiled, x, rounds=20)
    gated = {r.name for r in report.gated_layers}
    rows = [e for e in b["layers"] if e["gated_ms"] is not None]
    g = [e for e in rows if e["layer"] in gated]
    o = [e for e in rows if e["layer"] not in gated]
    return {"gated_dense_ms": sum(e["dense_ms"] for e in g),
            "gated_gated_ms": sum(e["gated_ms"] for e in g),
            "other_layers_dense_ms": sum(e["dense_ms"] for e in o),
            "other_layers_gated_ms": sum(e["gated_ms"] for e in o),
            "outside_dense_ms": b["whole_dense_ms"] - b["conv_dense_ms"],
            "outside_gated_ms": b["whole_gated_ms"] - b["conv_gated_ms"], "breakdown": b}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--keep-ratio", type=float, default=0.5)
    p.add_argument("--mode", default="topk", choices=["topk", "threshold"])
    p.add_argument("--no-latency-aware", dest="latency_aware", action="store_false")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1])
    p.add_argument("--calibration", type=int, default=32, help="random calibration inputs")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--per-layer", action="store_true",
                   help="also time every conv/linear layer dense and gated at the smallest batch "
                        "size (hooks inside whole-model runs), and what runs outside them")
    p.add_argument("--runtimes", nargs="+", default=[], choices=DENSE_RUNTIMES,
                   help="also time the dense model in these runtimes and the compiled model "
                        "saved and loaded, each in processes of its own, at the smallest batch")
    p.add_argument("--runtime-rounds", type=int, default=3, help="processes per runtime")
    p.add_argument("--json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    retain_freed_memory()
    g = torch.Generator().manual_seed(1)
    calibration = [torch.randn(8, 3, args.image_size, args.image_size, generator=g)
                   for _ in range(max(1, args.calibration // 8))]
    out = []
    for name in args.models:
        model = build(name)
        cfg = ispc.GatingConfig(keep_ratio=args.keep_ratio, mode=args.mode,
                                latency_aware=args.latency_aware,
                                latency_batch_size=min(args.batch_sizes))
        t0 = time.perf_counter()
        compiled = ispc.compile(model, calibration, config=cfg, progress=False)
        compile_s = time.perf_counter() - t0
        results = benchmark(model, compiled, (3, args.image_size, args.image_size), batch_sizes=tuple(args.batch_sizes),
                            rounds=args.rounds, name=name, progress=False, retain_memory=False)
        s = compiled.report.summary
        mlp = mlp_summary(compiled.report)
        print(results_table(results))
        print(f"{name}: capture {s['capture']}, compiled in {compile_s:.0f} s; layers gated "
              f"{s['layers_gated']} of {s['layers_total']}, expected MAC cut "
              f"{s['mac_reduction']:.1%}; channel linears gated {mlp['gated']} of "
              f"{mlp['linear_layers']}")
        for reason in mlp["dense_reasons"]:
            print(f"  dense: {reason}")
        kernels: dict[str, int] = {}
        for r in compiled.report.gated_layers:
            kernels[r.cpu_kernel] = kernels.get(r.cpu_kernel, 0) + 1
        print(f"  kernels: {kernels}")
        for note in compiled.report.notes:
            if note.startswith("whole-model check"):
                print(f"  {note}")
        record = {"model": name, "results": [r.to_dict() for r in results], "summary": s,
                  "channel_linears": mlp, "kernels": kernels, "compile_s": compile_s,
                  "notes": compiled.report.notes}
        if args.per_layer:
            x = torch.randn(min(args.batch_sizes), 3, args.image_size, args.image_size, generator=g)
            dense = dense_baseline(model, x[:1])
            record["per_layer"] = per_layer(dense, compiled, x, compiled.report)
            pl = record["per_layer"]
            print(f"  per layer (ms, dense -> gated): gated layers {pl['gated_dense_ms']:.2f} -> "
                  f"{pl['gated_gated_ms']:.2f}, layers left dense {pl['other_layers_dense_ms']:.2f}"
                  f" -> {pl['other_layers_gated_ms']:.2f}, outside conv/linear layers "
                  f"{pl['outside_dense_ms']:.2f} -> {pl['outside_gated_ms']:.2f}")
        if args.runtimes:
            bs = min(args.batch_sizes)
            timings = time_runtimes(model, compiled, input_batches(
                bs, input_shape=(3, args.image_size, args.image_size)), runtimes=args.runtimes,
                threads=args.threads, rounds=args.runtime_rounds, calls=args.rounds, name=name,
                progress=False)
            print(runtimes_table(timings))
            record["runtimes"] = [t.to_dict() for t in timings]
        out.append(record)
    env = {k: v for k, v in machine_info(args.threads).items() if k not in ("runtimes", "allocator")}
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"environment": env, "config": vars(args), "models": out}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
