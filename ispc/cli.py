"""The ``ispc`` command line: demo, inspect, compile, bench, tune.

A user's mistake ends with one line on stderr and a non-zero exit status; ``--debug`` shows the
traceback. Progress bars go to stderr, results to stdout (tables, or JSON/Markdown on request).
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib
import importlib.util
import json
import pickle
import sys
import traceback
import typing
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn
from torch.export import ExportedProgram

from .api import compile as ispc_compile
from .api import inspect
from .backends import BACKENDS
from .benchmark import (benchmark, benchmark_runtimes, dense_baseline, input_batches,
                        layer_breakdown, layer_table, results_table, retain_freed_memory)
from .config import GatingConfig
from .datasets import iter_batches, load_images, load_labeled_images
from .errors import ConfigError, IspcError, UnsupportedModelError
from .examples.models import MODELS
from .passes.channels_last import runs_channels_last
from .plots import save_plots
from .runtimes import (BASELINES, DENSE_RUNTIMES, compare, machine_info, resolve_runtimes,
                       runtimes_table, speedup_lines)
from .serialization import load, save
from .tune import TARGETS, top1, tune

__all__ = ["main", "load_model", "build_parser", "add_config_args", "config_from_args",
           "parse_model_args", "load_leaf_modules"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def _import_attr(spec: str, what: str) -> Any:
    """``attr`` of ``path/to/file.py:attr`` or ``package.module:attr`` (``what``: for messages)."""
    where, _, attr = spec.rpartition(":")
    if not where or not attr:
        raise UnsupportedModelError(f"{what} {spec!r} must be path/to/file.py:name or "
                                    "package.module:name")
    if where.endswith(".py") or "/" in where:
        path = Path(where)
        if not path.is_file():
            raise UnsupportedModelError(f"{what} file {where!r} does not exist")
        name = f"ispc_user_{path.stem}"
        module = sys.modules.get(name)
        if module is None or getattr(module, "__file__", None) != str(path):
            mod_spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(mod_spec)  # type: ignore[arg-type]
            sys.modules[name] = module
            try:
                mod_spec.loader.exec_module(module)  # type: ignore[union-attr]
            except Exception as exc:  # noqa: BLE001 -- the user's file: one line, not a traceback
                del sys.modules[name]
                raise UnsupportedModelError(f"importing {where!r} failed: {_first_line(exc)}") from None
    else:
        try:
            module = importlib.import_module(where)
        except Exception as exc:  # noqa: BLE001 -- ImportError or an error the module raises
            raise UnsupportedModelError(f"cannot import module {where!r}: {_first_line(exc)}") from None
    value = getattr(module, attr, None)
    if value is None:
        raise UnsupportedModelError(f"{where!r} has no {attr!r}"
                                    + (" that builds the model" if what == "model" else ""))
    return value


def parse_model_args(items: Sequence[str] | None) -> dict[str, Any]:
    """``--model-arg name=value`` pairs as keyword arguments: values are Python literals where they
    parse as one (``8``, ``0.5``, ``True``, ``(3, 4)``, ``'x'``), else strings."""
    kwargs: dict[str, Any] = {}
    for item in items or ():
        name, sep, text = item.partition("=")
        if not sep or not name.isidentifier():
            raise UnsupportedModelError(f"--model-arg {item!r} must be name=value, e.g. "
                                        "--model-arg num_classes=10")
        try:
            kwargs[name] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            kwargs[name] = text
    return kwargs


def load_leaf_modules(specs: Sequence[str] | None) -> tuple[type, ...]:
    """``--leaf-module pkg.mod:Class`` (or ``file.py:Class``) as module classes."""
    classes = []
    for spec in specs or ():
        cls = _import_attr(spec, "--leaf-module")
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise UnsupportedModelError(f"--leaf-module {spec!r} is not an nn.Module class")
        classes.append(cls)
    return tuple(classes)


def load_model(spec: str, *, checkpoint: str | None = None, num_classes: int | None = None,
               model_args: dict[str, Any] | None = None) -> nn.Module:
    """Build a model from ``path/to/file.py:factory``, ``package.module:factory`` or the name of a
    bundled example model (``resnet18``, ``resnet20``, ...), called with ``model_args`` (and
    ``num_classes``) as keyword arguments; optionally load a state dict. An exception the factory
    raises is a one-line :class:`UnsupportedModelError`."""
    kwargs = dict(model_args or {})
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if ":" not in spec:
        if spec not in MODELS and (spec.endswith(".ispc") or Path(spec).is_file()):
            raise UnsupportedModelError(
                f"{spec!r} is a file, not a model: MODEL is path/to/file.py:factory, "
                "package.module:factory or a bundled model name; to time a saved compiled model, "
                f"ispc bench MODEL --saved {spec} (MODEL: the model it was compiled from)")
        if spec not in MODELS:
            raise UnsupportedModelError(
                f"unknown model {spec!r}: give path/to/file.py:factory, package.module:factory or one "
                f"of the bundled models: {', '.join(sorted(MODELS))}")
        factory = MODELS[spec]
    else:
        factory = _import_attr(spec, "model")
        if not callable(factory):  # (a missing name says "has no ... that builds the model")
            raise UnsupportedModelError(f"{spec.rpartition(':')[0]!r} has no callable "
                                        f"{spec.rpartition(':')[2]!r} that builds the model")
    try:
        model = factory(**kwargs)
    except Exception as exc:  # noqa: BLE001 -- the user's factory: one line, not a traceback
        args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
        raise UnsupportedModelError(f"{spec}({args}) raised {_first_line(exc)}; check the "
                                    "--model-arg values the factory takes") from None
    if isinstance(model, ExportedProgram):  # captured already: ispc.compile takes it as it is
        return model
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(f"{spec!r} returned a {type(model).__name__}, not an nn.Module "
                                    "(or a torch.export ExportedProgram)")
    if checkpoint:
        try:
            model.load_state_dict(_state_dict(checkpoint))
        except RuntimeError as exc:  # torch's first line names no key: say which ones, on one line
            lines = [ln.strip().rstrip(".") for ln in str(exc).splitlines() if ln.strip()]
            detail = "; ".join(lines[1:] or lines)
            detail = detail if len(detail) <= 300 else detail[:297] + "..."
            raise UnsupportedModelError(f"checkpoint {checkpoint!r} does not fit {spec!r}: {detail}; "
                                        "give the factory the arguments it was trained with "
                                        "(--num-classes, --model-arg)") from None
    return model.eval()


def _state_dict(checkpoint: str) -> dict[str, Any]:
    """``--checkpoint``'s state dict (``{"model": state_dict}`` too), or a one-line error that says
    what the file holds instead and how to save one."""
    fix = "save one with torch.save(model.state_dict(), path)"
    if not Path(checkpoint).is_file():
        raise UnsupportedModelError(f"checkpoint {checkpoint!r} does not exist")
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Unsupported global" not in str(exc):  # a file torch.save did not write
            raise UnsupportedModelError(f"checkpoint {checkpoint!r} is not a file torch.load reads; "
                                        f"{fix}") from None
        raise UnsupportedModelError(  # torch.save(model): classes a weights-only load never runs
            f"checkpoint {checkpoint!r} holds pickled Python objects (a whole model?), which ispc "
            f"does not load (weights_only=True); {fix}") from None
    except Exception as exc:  # noqa: BLE001 -- not a file torch.save wrote: one line
        raise UnsupportedModelError(f"checkpoint {checkpoint!r} is not a file torch.load reads "
                                    f"({_first_line(exc)}); {fix}") from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise UnsupportedModelError(f"checkpoint {checkpoint!r} holds a {type(state).__name__}, "
                                    f"not a state dict; {fix}")
    return state


def _load_data(args: argparse.Namespace) -> torch.Tensor:
    mean = tuple(args.mean) if args.mean else (IMAGENET_MEAN if args.normalize == "imagenet" else None)
    std = tuple(args.std) if args.std else (IMAGENET_STD if args.normalize == "imagenet" else None)
    return load_images(args.data, image_size=args.image_size, mean=mean, std=std, limit=args.limit)


#: a ``bool | None`` option on the command line (``--channels-last auto``: None, measured)
TRISTATE = {"auto": None, "on": True, "off": False}


def _kind(hint: Any) -> str:
    """How a GatingConfig field's type appears on the command line."""
    if hint in (bool, int, float, str):
        return hint.__name__
    args = set(typing.get_args(hint))
    if args == {bool, type(None)}:
        return "tristate"
    if str in {a for t in args | {hint} for a in typing.get_args(t)}:
        return "patterns"  # tuple[str, ...] (or None)
    raise TypeError(f"no command-line form for {hint!r}")


def add_config_args(p: argparse.ArgumentParser, *, defaults: dict[str, Any] | None = None,
                    skip: Sequence[str] = ()) -> None:
    """One option per :class:`GatingConfig` field (``--keep-ratio``, ``--mode``, ...), with the
    field's default (or ``defaults``' for this command), type, choices and help: the config is the
    one place they are written. ``skip``: fields the command sets itself."""
    hints = typing.get_type_hints(GatingConfig)
    group = p.add_argument_group("gating options (ispc.GatingConfig)")
    given: dict[str, Any] = {}  # dest -> its default as parsed (what ``_gating_set`` compares)
    for f in dataclasses.fields(GatingConfig):
        if not f.metadata.get("cli", True) or f.name in skip:
            continue
        default = (defaults or {}).get(f.name, f.default)
        flag, text = "--" + f.name.replace("_", "-"), f.metadata["help"]
        kind = _kind(hints[f.name])
        if kind == "bool":
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=default,
                               help=f"{text} (default: {'on' if default else 'off'})")
        elif kind == "tristate":
            name = next(k for k, v in TRISTATE.items() if v is default)
            group.add_argument(flag, choices=list(TRISTATE), default=name,
                               help=f"{text} (default: {name})")
        elif kind == "patterns":
            group.add_argument(flag, nargs="+", metavar="PATTERN", default=default, help=text)
        else:
            group.add_argument(flag, type={"int": int, "float": float, "str": str}[kind],
                               choices=f.metadata.get("choices"), default=default,
                               help=f"{text} (default: {default})")
        given[f.name] = p.get_default(f.name)
    p.set_defaults(_config_defaults=given)


def _gating_set(args: argparse.Namespace) -> list[str]:
    """The gating options given other values than their defaults (as ``--keep-ratio``)."""
    defaults = getattr(args, "_config_defaults", {})
    return ["--" + d.replace("_", "-") for d, v in defaults.items() if getattr(args, d) != v]


def config_from_args(args: argparse.Namespace, **overrides: Any) -> GatingConfig:
    """The :class:`GatingConfig` the options of :func:`add_config_args` describe, with
    ``overrides`` (what the command decides itself) on top."""
    hints = typing.get_type_hints(GatingConfig)
    kw: dict[str, Any] = {}
    for f in dataclasses.fields(GatingConfig):
        if not hasattr(args, f.name):
            continue
        value, kind = getattr(args, f.name), _kind(hints[f.name])
        if kind == "tristate":
            value = TRISTATE[value]
        elif kind == "patterns" and value is not None:
            value = tuple(value)
        kw[f.name] = value
    if getattr(args, "leaf_module", None):
        kw["leaf_modules"] = load_leaf_modules(args.leaf_module)
    kw.update(overrides)
    return GatingConfig(**kw)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="path/to/file.py:factory, package.module:factory, or a bundled model "
                                 "name (resnet18, resnet20, vgg16_bn, mobilenet_v2, ...)")
    p.add_argument("--checkpoint", help="state dict to load into the model (loaded weights_only)")
    p.add_argument("--num-classes", type=int, help="passed to the factory as num_classes")
    p.add_argument("--model-arg", action="append", metavar="NAME=VALUE",
                   help="a keyword argument for the factory (a Python literal, else a string); "
                        "repeatable: --model-arg depth=18 --model-arg pretrained=False")
    p.add_argument("--leaf-module", action="append", metavar="PKG.MOD:CLASS",
                   help="a module class torch.fx must not trace into (GatingConfig.leaf_modules); "
                        "repeatable; path/to/file.py:Class works too")


def _add_data_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--data", required=required,
                   help="folder of images (recursive), .tar/.tar.gz of images, or .pt N x C x H x W tensor")
    p.add_argument("--image-size", type=int, help="resize shorter side and center-crop to this size")
    p.add_argument("--normalize", choices=["imagenet", "none"], default="imagenet",
                   help="per-channel normalization of the images, .pt tensors included "
                        "(default: imagenet; none: data already normalized)")
    p.add_argument("--mean", type=float, nargs=3, help="custom normalization mean")
    p.add_argument("--std", type=float, nargs=3, help="custom normalization std")
    p.add_argument("--batch-size", type=int, default=32, help="calibration batch size")
    p.add_argument("--limit", type=int, help="use at most this many images")


#: demo and bench time what they compile: latency-aware selection by default, at the smallest
#: batch size they time (they set ``latency_batch_size`` themselves)
_TIMED = {"defaults": {"latency_aware": True}, "skip": ("latency_batch_size",)}
_RUNTIME_CHOICES = ("all", "none", *DENSE_RUNTIMES)


def _add_runtime_args(p: argparse.ArgumentParser, *, default: str, rounds: int) -> None:
    p.add_argument("--runtimes", nargs="*", choices=_RUNTIME_CHOICES, metavar="NAME",
                   default=[default],
                   help=f"also time the dense model in these runtimes, each in fresh processes of "
                        f"its own ({', '.join(_RUNTIME_CHOICES)}; the flag alone: all; one not "
                        f"installed is skipped with a note; default: {default})")
    p.add_argument("--baseline", choices=BASELINES, default="best",
                   help="the dense runtime speed-ups divide by (best: the fastest float32 one "
                        "measured; default: best)")
    p.add_argument("--runtime-rounds", type=int, default=rounds,
                   help=f"fresh processes per runtime, order rotated (default: {rounds})")


def _runtime_names(args: argparse.Namespace) -> list[str]:
    return resolve_runtimes(args.runtimes or "all", args.baseline)


def _print_runtimes(timings, baseline: str) -> None:
    print("\ndense runtimes, each in fresh processes of its own (ms, medians; * the fastest "
          "float32 one; ispc saved and loaded in a fresh process):")
    print(runtimes_table(timings, baseline=baseline, tablefmt="simple"))
    print("\n".join(speedup_lines(timings, baseline=baseline)))


_RETAIN_HELP = ("keep freed memory in glibc's malloc for reuse, for dense and gated alike "
                "(see ispc.timing.retain_freed_memory; default: on)")


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
    p.add_argument("--retain-memory", action=argparse.BooleanOptionalAction, default=True,
                   help=_RETAIN_HELP)
    _add_runtime_args(p, default="all", rounds=1)
    add_config_args(p, **_TIMED)

    p = sub.add_parser("inspect", help="analyse a model: per-layer CV, gating decisions, MACs")
    _add_model_args(p)
    _add_data_args(p)
    p.add_argument("--format", choices=["table", "json", "markdown"], default="table")
    p.add_argument("--out", help="write the report here instead of stdout")
    p.add_argument("--plots", metavar="DIR", help="save cv.png and kept.png here (needs matplotlib)")
    p.add_argument("--dot", metavar="FILE", help="save the channel graph as Graphviz DOT")
    add_config_args(p)

    p = sub.add_parser("compile", help="compile a model and save it (load with ispc.load)")
    _add_model_args(p)
    _add_data_args(p)
    p.add_argument("--backend", choices=list(BACKENDS), default="eager",
                   help="; ".join(f"{b.name}: {b.help}" for b in BACKENDS.values()))
    p.add_argument("--out", required=True, help="output file")
    add_config_args(p)

    p = sub.add_parser("bench", help="time a compiled model against its BN-folded dense self "
                       "and, with --runtimes, the dense model in every installed runtime")
    _add_model_args(p)
    _add_data_args(p, required=False)
    p.add_argument("--saved", metavar="FILE",
                   help="time this compiled model (ispc compile --out, ispc.save) instead of "
                        "compiling MODEL; MODEL (with --checkpoint) names its dense original, "
                        "the baseline, and gating options do not apply")
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
    p.add_argument("--retain-memory", action=argparse.BooleanOptionalAction, default=True,
                   help=_RETAIN_HELP)
    _add_runtime_args(p, default="none", rounds=3)
    add_config_args(p, **_TIMED)

    p = sub.add_parser("tune", help="search per-layer keep ratios for the fastest model within an "
                       "accuracy budget, and save it (ispc.tune)")
    _add_model_args(p)
    _add_data_args(p)
    p.add_argument("--val-data", required=True,
                   help="labelled validation images: a folder with one subfolder per class, or a "
                        ".pt file holding (x, y); preprocessed as --data")
    p.add_argument("--val-limit", type=int, help="use a fixed random subset of this many")
    p.add_argument("--max-drop", type=float, required=True,
                   help="top-1 points (percent) the result may lose against the dense model")
    p.add_argument("--relative", action="store_true",
                   help="--max-drop is a fraction of the dense top-1 (0.01: 1%% of it)")
    p.add_argument("--confidence", type=float, default=0.9,
                   help="one-sided confidence that the result's drop is within --max-drop, given "
                        "the validation images' noise (0.5: the point estimate)")
    p.add_argument("--target", choices=TARGETS, default="latency",
                   help="latency: lowest measured latency (latency-aware); macs: fewest MACs")
    p.add_argument("--time-budget", type=float, metavar="SECONDS",
                   help="stop then and save the best model found so far")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", metavar="FILE", help="keep the search's evaluations here (resumable)")
    p.add_argument("--report-json", metavar="FILE", help="also write the search's report as JSON")
    p.add_argument("--out", required=True, help="output file (load with ispc.load)")
    add_config_args(p, skip=("keep_ratio", "allocation"))
    return parser


def _calibration(args: argparse.Namespace):
    x = _load_data(args)
    return x, list(iter_batches(x, args.batch_size))


def _cmd_demo(args: argparse.Namespace) -> int:
    cfg = config_from_args(args, latency_batch_size=min(args.batch_sizes))
    if args.retain_memory:  # before compiling: latency-aware selection times kernels too
        retain_freed_memory()
    model = load_model(args.model)
    size = args.image_size
    g = torch.Generator().manual_seed(0)
    data = [torch.randn(16, 3, size, size, generator=g) for _ in range(max(1, args.calibration_size // 16))]
    print(f"ispc demo: {args.model} with random weights on random {size}x{size} inputs "
          f"(shows the pipeline and real speed; accuracy needs a trained model and real data)\n")
    compiled = ispc_compile(model, data, config=cfg)
    print(compiled.report)
    print()
    names = _runtime_names(args)
    results = benchmark(model, compiled, (3, size, size), batch_sizes=tuple(args.batch_sizes),
                        rounds=args.rounds, name=args.model, retain_memory=args.retain_memory)
    print(results_table(results))
    if names:  # a few calls in one process per runtime: a first look, not a benchmark
        timings = benchmark_runtimes(model, compiled, (3, size, size),
                                     batch_sizes=tuple(args.batch_sizes), runtimes=names,
                                     baseline=args.baseline, rounds=args.runtime_rounds,
                                     calls=args.rounds, warmup=3, name=args.model)
        _print_runtimes(timings, args.baseline)
    return 0


def _model(args: argparse.Namespace) -> nn.Module:
    """MODEL built with the options every model-taking command shares, read in one place so that
    each command honours all of them."""
    return load_model(args.model, checkpoint=args.checkpoint, num_classes=args.num_classes,
                      model_args=parse_model_args(args.model_arg))


def _cmd_inspect(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    model = _model(args)
    _, batches = _calibration(args)
    report = inspect(model, batches, config=cfg)
    text = {"table": report.to_table, "json": report.to_json, "markdown": report.to_markdown}[args.format]()
    if args.out:
        Path(args.out).write_text(text + "\n")
        print(f"report written to {args.out}", file=sys.stderr)
    else:
        print(text)
    if args.plots:
        for path in save_plots(report, args.plots):
            print(f"plot written to {path}", file=sys.stderr)
    if args.dot:
        Path(args.dot).write_text(report.to_dot())
        print(f"channel graph written to {args.dot} (render: dot -Tsvg {args.dot})", file=sys.stderr)
    return 0


def _cmd_compile(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    model = _model(args)
    _, batches = _calibration(args)
    compiled = ispc_compile(model, batches, config=cfg, backend=args.backend)
    save(compiled, args.out)
    print(compiled.report)
    print(f"\ncompiled model written to {args.out} (load with ispc.load)", file=sys.stderr)
    return 0


def _load_saved(args: argparse.Namespace, model: nn.Module, example: torch.Tensor):
    """``--saved``: the archive, checked against its dense original ``model`` on ``example``."""
    if given := _gating_set(args):
        raise ConfigError(f"{', '.join(given)}: gating options do not apply to a saved "
                         f"model (--saved {args.saved}, compiled with its own); drop them, or "
                         "drop --saved to compile MODEL with them")
    if not Path(args.saved).is_file():
        raise ConfigError(f"--saved {args.saved!r} does not exist; write one with "
                         f"ispc compile {args.model} --data DATA --out {args.saved}")
    compiled = load(args.saved)
    with torch.no_grad():
        try:
            got = compiled(example)
        except Exception as exc:  # noqa: BLE001 -- a saved model of another input: one line
            raise ConfigError(f"--saved {args.saved} cannot run a {tuple(example.shape)} input "
                             f"({_first_line(exc)}); time it on the inputs it was compiled "
                             "for (--input-size or --data)") from None
        want = model(example)
    shapes = [tuple(t.shape) for t in (got, want) if isinstance(t, torch.Tensor)]
    if len(shapes) == 2 and shapes[0] != shapes[1]:
        raise ConfigError(f"--saved {args.saved} returns {shapes[0]} where {args.model} returns "
                         f"{shapes[1]}: name the model it was compiled from as MODEL")
    return compiled


def _cmd_bench(args: argparse.Namespace) -> int:
    cfg = config_from_args(args, latency_batch_size=min(args.batch_sizes))
    if args.retain_memory:  # before compiling: latency-aware selection times kernels too
        retain_freed_memory()
    model = _model(args)
    x = None
    if args.data:  # calibrated and timed on the user's images: their sparsity is what counts
        x, batches = _calibration(args)
        shape = tuple(x.shape[1:])
    else:
        g = torch.Generator().manual_seed(0)
        shape = (3, args.input_size, args.input_size)
        batches = [torch.randn(16, *shape, generator=g) for _ in range(4)]
    names = _runtime_names(args)
    compiled = (_load_saved(args, model, batches[0][:1]) if args.saved
                else ispc_compile(model, batches, config=cfg))
    results = benchmark(model, compiled, shape, batch_sizes=tuple(args.batch_sizes),
                        rounds=args.rounds, warmup=args.warmup, name=args.model,
                        retain_memory=args.retain_memory, inputs=x, input_pool=args.input_pool)
    print(results_table(results))
    payload = [r.to_dict() for r in results]
    if args.per_layer:
        dense = dense_baseline(model, batches[0][:1],
                               channels_last=runs_channels_last(compiled.graph_module))
        for b, entry in zip(args.batch_sizes, payload):
            xb = input_batches(b, inputs=x, input_shape=shape)[0]
            breakdown = layer_breakdown(dense, compiled, xb, rounds=args.rounds)
            entry["per_layer"] = breakdown
            print(f"\nper layer, batch {b}:")
            print(layer_table(dense, compiled, None, breakdown=breakdown))
    doc: dict[str, Any] = {"machine": machine_info(torch.get_num_threads()), "results": payload}
    if names:
        timings = benchmark_runtimes(model, compiled, shape, batch_sizes=tuple(args.batch_sizes),
                                     runtimes=names, baseline=args.baseline,
                                     rounds=args.runtime_rounds, calls=args.rounds,
                                     warmup=args.warmup, name=args.model, inputs=x,
                                     input_pool=args.input_pool)
        _print_runtimes(timings, args.baseline)
        doc.update(baseline=args.baseline, runtimes=[t.to_dict() for t in timings],
                   comparisons=[c.to_dict() for c in compare(timings, baseline=args.baseline)])
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
    return 0


def _cmd_tune(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    model = _model(args)
    _, batches = _calibration(args)
    mean = tuple(args.mean) if args.mean else (IMAGENET_MEAN if args.normalize == "imagenet" else None)
    std = tuple(args.std) if args.std else (IMAGENET_STD if args.normalize == "imagenet" else None)
    x, y, _ = load_labeled_images(args.val_data, image_size=args.image_size, mean=mean, std=std,
                                  limit=args.val_limit)
    val = [(x[i:i + args.batch_size], y[i:i + args.batch_size])
           for i in range(0, x.shape[0], args.batch_size)]
    tuned = tune(model, batches, evaluate=top1(val, per_sample=True), max_drop=args.max_drop,
                 relative=args.relative, target=args.target, config=cfg,
                 time_budget_s=args.time_budget, seed=args.seed, cache=args.cache,
                 confidence=args.confidence)
    save(tuned, args.out)
    print(tuned.tuning)
    if args.report_json:
        Path(args.report_json).write_text(tuned.tuning.to_json() + "\n")
    print(f"\ntuned model written to {args.out} (load with ispc.load; its config reproduces it with "
          "ispc.compile)", file=sys.stderr)
    return 0


COMMANDS = {"demo": _cmd_demo, "inspect": _cmd_inspect, "compile": _cmd_compile, "bench": _cmd_bench,
            "tune": _cmd_tune}


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
