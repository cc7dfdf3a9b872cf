"""The ``ispc`` command line: demo, inspect, compile, bench.

A user's mistake ends with one line on stderr and a non-zero exit status; ``--debug`` shows the
traceback. Progress bars go to stderr, results to stdout (tables, or JSON/Markdown on request).
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys
import traceback
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from .errors import IspcError, UnsupportedModelError

__all__ = ["main", "load_model", "build_parser"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def load_model(spec: str, *, checkpoint: str | None = None, num_classes: int | None = None) -> nn.Module:
    """Build a model from ``path/to/file.py:factory``, ``package.module:factory`` or the name of a
    bundled example model (``resnet18``, ``resnet20``, ...); optionally load a state dict."""
    from .examples.models import MODELS

    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    if ":" not in spec:
        if spec not in MODELS:
            raise UnsupportedModelError(
                f"unknown model {spec!r}: give path/to/file.py:factory, package.module:factory or one "
                f"of the bundled models: {', '.join(sorted(MODELS))}")
        model = MODELS[spec](**kwargs)
    else:
        where, _, attr = spec.rpartition(":")
        if where.endswith(".py") or "/" in where:
            path = Path(where)
            if not path.is_file():
                raise UnsupportedModelError(f"model file {where!r} does not exist")
            mod_spec = importlib.util.spec_from_file_location(f"ispc_user_{path.stem}", path)
            module = importlib.util.module_from_spec(mod_spec)  # type: ignore[arg-type]
            sys.modules[mod_spec.name] = module  # type: ignore[union-attr]
            mod_spec.loader.exec_module(module)  # type: ignore[union-attr]
        else:
            try:
                module = importlib.import_module(where)
            except ImportError as exc:
                raise UnsupportedModelError(f"cannot import module {where!r}: {exc}") from None
        factory = getattr(module, attr, None)
        if not callable(factory):
            raise UnsupportedModelError(f"{where!r} has no callable {attr!r} that builds the model")
        model = factory(**kwargs)
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(f"{spec!r} returned a {type(model).__name__}, not an nn.Module")
    if checkpoint:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
            state = state["model"]
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            raise UnsupportedModelError(f"checkpoint {checkpoint!r} does not fit {spec!r}: "
                                        f"{str(exc).splitlines()[0]}") from None
    return model.eval()


def _load_data(args: argparse.Namespace) -> torch.Tensor:
    from .datasets import load_images

    mean = tuple(args.mean) if args.mean else (IMAGENET_MEAN if args.normalize == "imagenet" else None)
    std = tuple(args.std) if args.std else (IMAGENET_STD if args.normalize == "imagenet" else None)
    return load_images(args.data, image_size=args.image_size, mean=mean, std=std, limit=args.limit)


#: --channels-last -> GatingConfig.channels_last
_LAYOUTS = {"auto": None, "on": True, "off": False}


def _config(args: argparse.Namespace):
    from .config import GatingConfig

    kw: dict[str, Any] = {"keep_ratio": args.keep_ratio, "mode": args.mode, "saliency": args.saliency,
                          "allocation": args.allocation, "gate_linear": args.gate_linear,
                          "prune_dead": args.prune_dead,
                          "channels_last": _LAYOUTS[args.channels_last]}
    if getattr(args, "min_cv", None) is not None:
        kw["min_cv"] = args.min_cv
    return GatingConfig(**kw)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="path/to/file.py:factory, package.module:factory, or a bundled model "
                                 "name (resnet18, resnet20, vgg16_bn, mobilenet_v2, ...)")
    p.add_argument("--checkpoint", help="state dict to load into the model (loaded weights_only)")
    p.add_argument("--num-classes", type=int, help="passed to the factory as num_classes")


def _add_data_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--data", required=required,
                   help="folder of images (recursive), .tar/.tar.gz of images, or .pt N x C x H x W tensor")
    p.add_argument("--image-size", type=int, help="resize shorter side and center-crop to this size")
    p.add_argument("--normalize", choices=["imagenet", "none"], default="imagenet",
                   help="per-channel normalization of decoded images (default: imagenet)")
    p.add_argument("--mean", type=float, nargs=3, help="custom normalization mean")
    p.add_argument("--std", type=float, nargs=3, help="custom normalization std")
    p.add_argument("--batch-size", type=int, default=32, help="calibration batch size")
    p.add_argument("--limit", type=int, help="use at most this many images")


def _add_gating_args(p: argparse.ArgumentParser, keep: float | None = 0.5) -> None:
    p.add_argument("--keep-ratio", type=float, default=keep, help="average fraction of channels kept")
    p.add_argument("--mode", choices=["threshold", "topk"], default="threshold")
    p.add_argument("--saliency", choices=["l2", "l1", "weighted_l2"], default="l2")
    p.add_argument("--allocation", choices=["layer", "global"], default="layer",
                   help="keep ratio per layer, or one network-wide cut over the gated layers' MACs")
    p.add_argument("--min-cv", type=float, help="leave layers whose CV is below this dense")
    p.add_argument("--gate-linear", action=argparse.BooleanOptionalAction, default=False,
                   help="also gate linear layers on a flattened feature map or a vector (the "
                        "classifier; GatingConfig.gate_linear)")
    p.add_argument("--prune-dead", action=argparse.BooleanOptionalAction, default=True,
                   help="remove channels no calibration input keeps, from the producing layer too "
                        "(GatingConfig.prune_dead; default: on)")
    p.add_argument("--channels-last", choices=sorted(_LAYOUTS), default="auto",
                   help="run the feature maps channels-last on the CPU (GatingConfig.channels_last; "
                        "auto: measured when compiling latency-aware)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ispc", description="Instance-wise Sparsity Compiler: skip each input's negligible "
        "channels in a PyTorch CNN, measured in wall-clock time.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="compile a bundled model on random data, print its report and "
                       "its measured speed against dense")
    p.add_argument("--model", default="resnet18", help="bundled model (default: resnet18)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--calibration-size", type=int, default=64, help="random calibration inputs")
    p.add_argument("--rounds", type=int, default=20, help="timing rounds per candidate")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1])
    p.add_argument("--latency-aware", action=argparse.BooleanOptionalAction, default=True,
                   help="time kernels at compile time, keep layers dense where gating does not pay")
    p.add_argument("--retain-memory", action=argparse.BooleanOptionalAction, default=True,
                   help="keep freed memory in glibc's malloc for reuse, for dense and gated alike "
                        "(see ispc.benchmark.retain_freed_memory; default: on)")
    _add_gating_args(p)

    p = sub.add_parser("inspect", help="analyse a model: per-layer CV, gating decisions, MACs")
    _add_model_args(p)
    _add_data_args(p)
    _add_gating_args(p)
    p.add_argument("--format", choices=["table", "json", "markdown"], default="table")
    p.add_argument("--out", help="write the report here instead of stdout")
    p.add_argument("--plots", metavar="DIR", help="save cv.png and kept.png here (needs matplotlib)")
    p.add_argument("--dot", metavar="FILE", help="save the channel graph as Graphviz DOT")

    p = sub.add_parser("compile", help="compile a model and save it (load with ispc.load)")
    _add_model_args(p)
    _add_data_args(p)
    _add_gating_args(p)
    p.add_argument("--backend", default="eager")
    p.add_argument("--out", required=True, help="output file")

    p = sub.add_parser("bench", help="time a compiled model against its BN-folded dense self")
    _add_model_args(p)
    _add_data_args(p, required=False)
    _add_gating_args(p)
    p.add_argument("--input-size", type=int, default=224, help="random input size if no --data")
    p.add_argument("--input-pool", type=int, default=4, metavar="N",
                   help="without --data: distinct random batches each model cycles through per "
                        "batch size (with --data: the images themselves; default 4)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--json", help="also write results as JSON here")
    p.add_argument("--per-layer", action="store_true",
                   help="also time each layer at each batch size, beside the whole model (table, "
                        "and 'per_layer' in --json)")
    p.add_argument("--latency-aware", action=argparse.BooleanOptionalAction, default=True,
                   help="time kernels at compile time and leave layers dense where gating does "
                        "not pay (default: on)")
    p.add_argument("--retain-memory", action=argparse.BooleanOptionalAction, default=True,
                   help="keep freed memory in glibc's malloc for reuse, for dense and gated alike "
                        "(see ispc.benchmark.retain_freed_memory; default: on)")
    return parser


def _calibration(args: argparse.Namespace):
    from .datasets import iter_batches

    x = _load_data(args)
    return x, list(iter_batches(x, args.batch_size))


def _cmd_demo(args: argparse.Namespace) -> int:
    from .api import compile as ispc_compile
    from .benchmark import benchmark, results_table, retain_freed_memory
    from .config import GatingConfig

    if args.retain_memory:  # before compiling: latency-aware selection times kernels too
        retain_freed_memory()
    model = load_model(args.model)
    size = args.image_size
    g = torch.Generator().manual_seed(0)
    data = [torch.randn(16, 3, size, size, generator=g) for _ in range(max(1, args.calibration_size // 16))]
    print(f"ispc demo: {args.model} with random weights on random {size}x{size} inputs "
          f"(shows the pipeline and real speed; accuracy needs a trained model and real data)\n")
    cfg = GatingConfig(keep_ratio=args.keep_ratio, mode=args.mode, saliency=args.saliency,
                       allocation=args.allocation, latency_aware=args.latency_aware,
                       latency_batch_size=min(args.batch_sizes), gate_linear=args.gate_linear,
                       prune_dead=args.prune_dead, channels_last=_LAYOUTS[args.channels_last])
    compiled = ispc_compile(model, data, config=cfg)
    print(compiled.report)
    print()
    results = benchmark(model, compiled, (3, size, size), batch_sizes=tuple(args.batch_sizes),
                        rounds=args.rounds, name=args.model, retain_memory=args.retain_memory)
    print(results_table(results))
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .api import inspect

    model = load_model(args.model, checkpoint=args.checkpoint, num_classes=args.num_classes)
    _, batches = _calibration(args)
    report = inspect(model, batches, config=_config(args))
    text = {"table": report.to_table, "json": report.to_json, "markdown": report.to_markdown}[args.format]()
    if args.out:
        Path(args.out).write_text(text + "\n")
        print(f"report written to {args.out}", file=sys.stderr)
    else:
        print(text)
    if args.plots:
        from .plots import save_plots

        for path in save_plots(report, args.plots):
            print(f"plot written to {path}", file=sys.stderr)
    if args.dot:
        Path(args.dot).write_text(report.to_dot())
        print(f"channel graph written to {args.dot} (render: dot -Tsvg {args.dot})", file=sys.stderr)
    return 0


def _cmd_compile(args: argparse.Namespace) -> int:
    from . import api

    model = load_model(args.model, checkpoint=args.checkpoint, num_classes=args.num_classes)
    _, batches = _calibration(args)
    compiled = api.compile(model, batches, config=_config(args), backend=args.backend)
    try:
        from .serialization import save
    except ImportError:  # pragma: no cover - serialization ships with ispc
        raise IspcError("this ispc build has no serialization support") from None
    save(compiled, args.out)
    print(compiled.report)
    print(f"\ncompiled model written to {args.out} (load with ispc.load)", file=sys.stderr)
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from .api import compile as ispc_compile
    from .benchmark import benchmark, results_table, retain_freed_memory

    if args.retain_memory:  # before compiling: latency-aware selection times kernels too
        retain_freed_memory()
    model = load_model(args.model, checkpoint=args.checkpoint, num_classes=args.num_classes)
    x = None
    if args.data:  # calibrated and timed on the user's images: their sparsity is what counts
        x, batches = _calibration(args)
        shape = tuple(x.shape[1:])
    else:
        g = torch.Generator().manual_seed(0)
        shape = (3, args.input_size, args.input_size)
        batches = [torch.randn(16, *shape, generator=g) for _ in range(4)]
    cfg = _config(args).replace(latency_aware=args.latency_aware,
                                latency_batch_size=min(args.batch_sizes))
    compiled = ispc_compile(model, batches, config=cfg)
    results = benchmark(model, compiled, shape, batch_sizes=tuple(args.batch_sizes),
                        rounds=args.rounds, warmup=args.warmup, name=args.model,
                        retain_memory=args.retain_memory, inputs=x, input_pool=args.input_pool)
    print(results_table(results))
    payload = [r.to_dict() for r in results]
    if args.per_layer:
        from .benchmark import dense_baseline, input_batches, layer_breakdown, layer_table
        from .passes.channels_last import runs_channels_last

        dense = dense_baseline(model, batches[0][:1],
                               channels_last=runs_channels_last(compiled.graph_module))
        for b, entry in zip(args.batch_sizes, payload):
            xb = input_batches(b, inputs=x, input_shape=shape)[0]
            breakdown = layer_breakdown(dense, compiled, xb, rounds=args.rounds)
            entry["per_layer"] = breakdown
            print(f"\nper layer, batch {b}:")
            print(layer_table(dense, compiled, None, breakdown=breakdown))
    if args.json:
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
    return 0


COMMANDS = {"demo": _cmd_demo, "inspect": _cmd_inspect, "compile": _cmd_compile, "bench": _cmd_bench}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return COMMANDS[args.command](args)
    except (IspcError, FileNotFoundError, PermissionError) as exc:
        if args.debug:
            traceback.print_exc()
        print(f"ispc {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
