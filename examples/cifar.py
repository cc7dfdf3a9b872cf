"""Train, fine-tune with feature decay, and evaluate CIFAR-10 models.

The models ispc is demonstrated on come from here: a dense run (``train``), then a fine-tune with
the feature-decay regularizer that teaches the network instance-wise channel sparsity
(``finetune``), then ``evaluate``. Runs are resumable and exactly reproducible from ``last.pt``
because each epoch's data order depends only on (seed, epoch).

    python examples/cifar.py train --model resnet20 --data ../shared/data/cifar10-jpeg.tar.gz \\
        --epochs 40 --out runs/resnet20_dense
    python examples/cifar.py finetune --checkpoint runs/resnet20_dense/best.pt \\
        --feature-decay 1e-4 --epochs 10 --data ... --out runs/resnet20_fd
    python examples/cifar.py evaluate --checkpoint runs/resnet20_fd/final.pt --data ...

Also runnable as ``python -m ispc.examples.cifar`` once ispc is installed. Accuracies are
fractions in [0, 1] in files and return values.
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import random
import shlex
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file from a checkout: make `ispc` and `examples` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F
from torch import nn

from ispc.datasets import CIFAR10
from ispc.errors import ConfigError, IspcError
from ispc.feature_decay import FeatureDecay

__all__ = [
    "build_model",
    "build_parser",
    "evaluate",
    "evaluate_top1",
    "load_checkpoint",
    "main",
    "resolve_device",
]

# Options that shape the training trajectory: a resumed run must use the values it started with.
_TRAJECTORY = ("model", "lr", "batch_size", "weight_decay", "momentum", "seed", "epochs",
               "max_batches", "feature_decay", "layers", "checkpoint")
_TRAIN_DEFAULTS: dict[str, Any] = {"lr": 0.1, "batch_size": 128, "weight_decay": 5e-4, "momentum": 0.9,
                                   "seed": 0, "max_batches": None, "layers": None}
_FINETUNE_DEFAULTS: dict[str, Any] = {**_TRAIN_DEFAULTS, "lr": 0.01}


# --------------------------------------------------------------------------------------------------
# Models and checkpoints
# --------------------------------------------------------------------------------------------------

def build_model(name: str, *, num_classes: int = 10) -> nn.Module:
    """A registered example model (``resnet20``, ...) or ``package.module:factory`` for your own."""
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"cannot import model factory {name!r}: {exc}") from exc
        return factory(num_classes=num_classes)
    try:
        from ispc.examples.models import create_model
    except ImportError:  # not installed: use the checkout's folder
        from examples.models import create_model
    try:
        return create_model(name, num_classes=num_classes)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from exc


def _torch_load(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"checkpoint {str(path)!r} does not exist")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(obj, dict) or "model" not in obj:
        raise ConfigError(f"{str(path)!r} is not a checkpoint written by examples/cifar.py")
    return obj


def load_checkpoint(path: str | os.PathLike[str], *, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """The model of a ``best.pt``/``final.pt``/``last.pt`` and the checkpoint's metadata."""
    ckpt = _torch_load(Path(path))
    name = ckpt.get("model_name") or ckpt.get("args", {}).get("model")
    if not name:
        raise ConfigError(f"{str(path)!r} does not say which model it holds (no 'model_name')")
    model = build_model(name, num_classes=int(ckpt.get("num_classes", 10)))
    model.load_state_dict(ckpt["model"])
    meta = {k: v for k, v in ckpt.items() if k not in ("model", "optimizer", "scheduler", "rng")}
    meta["model_name"] = name
    return model.to(device), meta


def _save(obj: dict[str, Any], path: Path) -> None:
    """Write atomically, so an interrupted run never leaves half a checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, float]:
    """``(mean cross-entropy, top-1 fraction)`` of ``model`` over ``loader``, in eval mode."""
    was_training = model.training
    model.eval()
    p = next(model.parameters(), None)
    device = p.device if p is not None else torch.device("cpu")
    loss_sum, correct, count = 0.0, 0, 0
    try:
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            out = model(x)
            loss_sum += F.cross_entropy(out, y, reduction="sum").item()
            correct += (out.argmax(1) == y).sum().item()
            count += y.numel()
    finally:
        model.train(was_training)
    if count == 0:
        raise ConfigError("the evaluation loader yielded no samples")
    return loss_sum / count, correct / count


def evaluate_top1(model: nn.Module, loader: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Top-1 accuracy (fraction in [0, 1]) of ``model`` over ``(images, labels)`` batches."""
    return evaluate(model, loader)[1]


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------

def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _progress(iterable: Iterable[Any], *, desc: str, total: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    interactive = sys.stderr.isatty()
    return tqdm(iterable, desc=desc, total=total, disable=not enabled, dynamic_ncols=interactive,
                mininterval=0.5 if interactive else 30.0, leave=interactive)


def _resolve_args(args: argparse.Namespace, defaults: dict[str, Any], out: Path) -> tuple[dict[str, Any] | None, argparse.Namespace]:
    """Fill defaults; on ``--resume`` take the run's own settings, refusing contradicting ones."""
    last = out / "last.pt"
    ckpt = None
    if args.resume and last.exists():
        ckpt = _torch_load(last)
        saved = ckpt["args"]
        clash = [f"--{k.replace('_', '-')} {getattr(args, k)!r} (run has {saved.get(k)!r})"
                 for k in _TRAJECTORY
                 if getattr(args, k, None) is not None and k in saved and getattr(args, k) != saved[k]]
        if clash:
            raise ConfigError(f"{str(last)!r} was started with other settings: {'; '.join(clash)}; "
                              "drop these options to resume, or start a new run in another --out")
        for k in (*_TRAJECTORY, "data"):
            if getattr(args, k, None) is None and k in saved:
                setattr(args, k, saved[k])
    elif args.resume:
        print(f"note: {last} does not exist yet; starting a new run", file=sys.stderr)
    elif last.exists():
        raise ConfigError(f"{str(out)!r} already holds a run; pass --resume to continue it "
                          "or choose another --out")
    for k, v in defaults.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    missing = [f"--{k.replace('_', '-')}" for k in args.required if getattr(args, k, None) is None]
    if missing:
        raise ConfigError(f"{args.command} needs {', '.join(missing)}")
    if args.epochs < 1:
        raise ConfigError(f"--epochs must be >= 1, got {args.epochs}")
    return ckpt, args


def _fit(args: argparse.Namespace, defaults: dict[str, Any]) -> int:
    out = Path(args.out)
    ckpt, args = _resolve_args(args, defaults, out)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(args.device)
    random.seed(args.seed)
    torch.manual_seed(args.seed)

    data = CIFAR10(args.data, cache_dir=args.cache_dir, progress=args.progress)
    train_loader = data.loader("train", batch_size=args.batch_size, train=True, seed=args.seed,
                               device=device, drop_last=True)
    test_loader = data.loader("test", batch_size=args.eval_batch_size, device=device)
    num_classes = data.num_classes

    parent: dict[str, Any] | None = None
    if args.command == "finetune":
        model, parent = load_checkpoint(args.checkpoint)
        model_name = parent["model_name"]
    else:
        model_name = args.model
        model = build_model(model_name, num_classes=num_classes)
    model.to(device)
    decay = FeatureDecay(model, args.feature_decay, layers=args.layers) if args.feature_decay else None

    steps = len(train_loader) if args.max_batches is None else min(args.max_batches, len(train_loader))
    if steps == 0:
        raise ConfigError(f"the training set has fewer images than --batch-size {args.batch_size}")
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, nesterov=True,
                          weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.epochs * steps)

    start_epoch, best = 0, -1.0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        _set_rng_state(ckpt["rng"])
        start_epoch, best = int(ckpt["epoch"]), float(ckpt["best_top1"])
        print(f"resuming {out} after epoch {start_epoch}/{args.epochs}", file=sys.stderr)

    log_path = out / "log.jsonl"
    if log_path.exists():  # drop lines of epochs that finished after the last checkpoint was written
        lines = [ln for ln in log_path.read_text().splitlines() if ln.strip()]
        keep = [ln for ln in lines if json.loads(ln)["epoch"] <= start_epoch]
        log_path.write_text("".join(ln + "\n" for ln in keep))

    saved_args = {k: v for k, v in vars(args).items() if k not in ("func", "required")}
    meta = {"model_name": model_name, "num_classes": num_classes, "classes": list(data.classes),
            "command": shlex.join([sys.argv[0], *args.argv]), "args": saved_args,
            "feature_decay": args.feature_decay or None,
            "parent": str(args.checkpoint) if args.command == "finetune" else None}

    stop_at = args.epochs if args.stop_after is None else min(args.epochs, start_epoch + args.stop_after)
    for epoch in range(start_epoch, stop_at):
        t0 = time.perf_counter()
        model.train()
        train_loader.set_epoch(epoch)
        lr = opt.param_groups[0]["lr"]
        loss_sum = decay_sum = 0.0
        correct = count = 0
        bar = _progress(train_loader, desc=f"epoch {epoch + 1}/{args.epochs}", total=steps,
                        enabled=args.progress)
        for i, (x, y) in enumerate(bar):
            if i >= steps:
                break
            out_logits = model(x)
            ce = F.cross_entropy(out_logits, y)
            loss = ce
            if decay is not None:
                reg = decay.value()
                loss = ce + reg
                decay_sum += reg.item() * y.numel()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if not math.isfinite(ce.item()):
                raise IspcError(f"training diverged at epoch {epoch + 1} step {i + 1} (loss {ce.item()}); "
                                "lower --lr")
            loss_sum += ce.item() * y.numel()
            correct += (out_logits.argmax(1) == y).sum().item()
            count += y.numel()
            if i % 20 == 0 and hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{loss_sum / count:.3f}", acc=f"{correct / count:.3f}", refresh=False)
        if hasattr(bar, "close"):
            bar.close()
        if decay is not None:
            decay.reset()  # do not keep the last batch's graph alive through evaluation
        test_loss, test_acc = evaluate(model, test_loader)
        record: dict[str, Any] = {"epoch": epoch + 1, "lr": lr, "train_loss": loss_sum / count,
                                  "train_acc": correct / count, "test_loss": test_loss,
                                  "test_acc": test_acc}
        if decay is not None:
            record["feature_decay"] = decay_sum / count
        record["seconds"] = time.perf_counter() - t0
        with open(log_path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        print(json.dumps(record), flush=True)

        weights = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        if test_acc > best:
            best = test_acc
            _save({**meta, "model": weights, "top1": test_acc, "epoch": epoch + 1}, out / "best.pt")
        _save({**meta, "model": weights, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
               "epoch": epoch + 1, "best_top1": best, "top1": test_acc, "rng": _rng_state()},
              out / "last.pt")
        if epoch + 1 == args.epochs:
            _save({**meta, "model": weights, "top1": test_acc, "epoch": epoch + 1}, out / "final.pt")
    if decay is not None:
        decay.remove()
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    args.required = ("model", "data", "epochs")
    return _fit(args, _TRAIN_DEFAULTS)


def _cmd_finetune(args: argparse.Namespace) -> int:
    args.required = ("checkpoint", "feature_decay", "data", "epochs")
    return _fit(args, _FINETUNE_DEFAULTS)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    model, meta = load_checkpoint(args.checkpoint, device=device)
    data = CIFAR10(args.data, cache_dir=args.cache_dir, progress=args.progress)
    loader = data.loader("test", batch_size=args.batch_size, device=device)
    top1 = evaluate_top1(model, loader)
    print(f"{meta['model_name']} {args.checkpoint}: dense test top-1 {100 * top1:.2f}%")
    return 0


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------

def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", help="cifar10-jpeg.tar.gz or a folder with train/<class>/ and test/<class>/")
    p.add_argument("--cache-dir", default=None,
                   help="where decoded images are cached (default $ISPC_CACHE_DIR or ~/.cache/ispc)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def _fit_options(p: argparse.ArgumentParser, defaults: dict[str, Any]) -> None:
    _common(p)
    p.add_argument("--out", required=True, help="run folder: log.jsonl, last.pt, best.pt, final.pt")
    p.add_argument("--epochs", type=int, help="number of epochs (sets the cosine schedule's length)")
    p.add_argument("--lr", type=float, help=f"initial learning rate (default {defaults['lr']})")
    p.add_argument("--batch-size", type=int, help=f"default {defaults['batch_size']}")
    p.add_argument("--weight-decay", type=float, help=f"default {defaults['weight_decay']}")
    p.add_argument("--momentum", type=float, help=f"Nesterov momentum (default {defaults['momentum']})")
    p.add_argument("--seed", type=int, help=f"default {defaults['seed']}")
    p.add_argument("--eval-batch-size", type=int, default=500)
    p.add_argument("--max-batches", type=int,
                   help="train on at most this many batches per epoch (smoke tests, timing)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from last.pt")
    p.add_argument("--stop-after", type=int, default=None,
                   help="leave after this many epochs in this invocation (continue later with --resume)")


def build_parser() -> argparse.ArgumentParser:
    """The ``train`` / ``finetune`` / ``evaluate`` command line."""
    parser = argparse.ArgumentParser(prog="cifar.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model from scratch")
    p.add_argument("--model", help="resnet20, resnet56, vgg16_cifar, mobilenet_v2_cifar, ... "
                                   "or package.module:factory")
    _fit_options(p, _TRAIN_DEFAULTS)
    p.set_defaults(func=_cmd_train, feature_decay=None, layers=None, checkpoint=None)

    p = sub.add_parser("finetune", help="fine-tune a trained checkpoint with feature decay")
    p.add_argument("--checkpoint", help="best.pt/final.pt of a trained run")
    p.add_argument("--feature-decay", type=float, metavar="LAMBDA", help="weight of the regularizer")
    p.add_argument("--layers", nargs="+", default=None,
                   help="module names whose inputs are regularized (default: dense convs with >= 16 inputs)")
    _fit_options(p, _FINETUNE_DEFAULTS)
    p.set_defaults(func=_cmd_finetune, model=None)

    p = sub.add_parser("evaluate", help="dense test top-1 of a checkpoint")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--batch-size", type=int, default=500)
    _common(p)
    p.set_defaults(func=_cmd_evaluate)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (2 for a usage or data error)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    if args.threads is not None:
        if args.threads < 1:
            print("error: --threads must be >= 1", file=sys.stderr)
            return 2
        torch.set_num_threads(args.threads)
    try:
        if args.command == "evaluate" and not args.data:
            raise ConfigError("evaluate needs --data")
        return int(args.func(args))
    except IspcError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
