"""Train, fine-tune with feature decay, and evaluate CIFAR-10 models.

The models ispc is demonstrated on come from here: a dense run (``train``), then a fine-tune with
the feature-decay regularizer that teaches the network instance-wise channel sparsity
(``finetune``), then ``evaluate``. Runs are resumable, and on the CPU exactly reproducible, from
``last.pt`` because each epoch's data order depends only on (seed, epoch).

    python examples/cifar.py train --model resnet20 --data ../shared/data/cifar10-jpeg.tar.gz \\
        --epochs 40 --out runs/resnet20_dense
    python examples/cifar.py finetune --checkpoint runs/resnet20_dense/final.pt \\
        --feature-decay 3e-4 --lr 0.05 --epochs 12 --data ... --out runs/resnet20_fd
    python examples/cifar.py evaluate --checkpoint runs/resnet20_fd/final.pt --data ... \
        --json eval.json --plot eval.png [--keep-ratios 0.5 0.6 0.7] [--modes threshold topk] \
        [--allocations layer global]

``average`` averages the weights of checkpoints fine-tuned from one parent (a model soup; or one
run's last epochs, as SWA does), re-estimates BatchNorm on training images and saves a checkpoint:

    python examples/cifar.py average runs/a/final.pt runs/b/final.pt --data ... --out soup.pt

``evaluate`` measures the dense top-1 and the fraction of negligible channels at the gating sites,
then ispc (calibrated on training images only) at each mode, allocation and keep ratio, and for each
threshold-mode point the static-pruning baseline (:func:`ispc.baselines.static_prune`) at the same
per-layer kept fractions: top-1, MAC reduction actually executed on the test images, and batch-1
speed-up against the dense model. It also checks the CV rationale per layer (``cv_check`` in the
JSON): how much a static mask changes each layer's output, and the top-1 of gating one layer at a
time, dynamically vs statically, against the layer's CV.

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
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file from a checkout: make `ispc` and `examples` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F
from torch import nn

import ispc
from ispc.baselines import kept_count, static_channels, static_prune
from ispc.benchmark import benchmark
from ispc.datasets import CIFAR10, CIFAR10Loader
from ispc.errors import ConfigError, IspcError
from ispc.feature_decay import FeatureDecay, default_sites
from ispc.modules import GatedConv2d
from ispc.records import records

try:
    from ispc.examples.models import create_model
except ImportError:  # ispc not installed: the checkout's folder
    from examples.models import create_model

__all__ = [
    "average_state_dicts",
    "build_model",
    "build_parser",
    "distillation_loss",
    "evaluate",
    "evaluate_top1",
    "load_checkpoint",
    "main",
    "plot_sweep",
    "resolve_device",
    "sparsity_sweep",
    "spearman",
    "static_error_check",
    "TeacherEnsemble",
]

# Options that shape the training trajectory: a resumed run must use the values it started with.
_TRAJECTORY = ("model", "lr", "batch_size", "weight_decay", "momentum", "seed", "epochs",
               "max_batches", "feature_decay", "feature_decay_start", "feature_decay_ramp", "layers",
               "checkpoint", "gate_keep_ratio", "gate_mode", "gate_allocation", "gate_anneal_epochs",
               "distill_from", "distill_weight", "distill_temperature")
_TRAIN_DEFAULTS: dict[str, Any] = {"lr": 0.1, "batch_size": 128, "weight_decay": 5e-4, "momentum": 0.9,
                                   "seed": 0, "max_batches": None, "layers": None,
                                   "feature_decay_start": 0.0, "feature_decay_ramp": 0,
                                   "gate_keep_ratio": None, "gate_mode": "threshold",
                                   "gate_allocation": "global", "gate_anneal_epochs": 0,
                                   "distill_from": None, "distill_weight": 0.9, "distill_temperature": 4.0}
_FINETUNE_DEFAULTS: dict[str, Any] = {**_TRAIN_DEFAULTS, "lr": 0.01}
SYNC_EVERY = 50  # training steps between reads of the running loss (and the divergence check)


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


def _model_name(ckpt: dict[str, Any], path: str | os.PathLike[str]) -> str:
    """The model a checkpoint holds (runs written before ``model_name`` say it in their args)."""
    name = ckpt.get("model_name") or ckpt.get("args", {}).get("model")
    if not name:
        raise ConfigError(f"{str(path)!r} does not say which model it holds (no 'model_name')")
    return name


def load_checkpoint(path: str | os.PathLike[str], *, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """The model of a ``best.pt``/``final.pt``/``last.pt`` and the checkpoint's metadata."""
    ckpt = _torch_load(Path(path))
    name = _model_name(ckpt, path)
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


def first_images(loader: Iterable[Any], images: int) -> Iterator[tuple[torch.Tensor, Any]]:
    """``(x, y)`` batches of ``loader`` cut to its first ``images`` images (``y`` is None for
    batches that are bare tensors): what the per-layer checks read."""
    seen = 0
    for batch in loader:
        x, y = (batch[0], batch[1]) if isinstance(batch, (tuple, list)) else (batch, None)
        x = x[:images - seen]
        yield x, (None if y is None else y[:images - seen])
        seen += int(x.shape[0])
        if seen >= images:
            break


@torch.no_grad()
def negligible_channels(model: nn.Module, loader: Iterable[Any], *, images: int = 1000,
                        rel: float = 0.01) -> dict[str, Any]:
    """How sparse the model is per instance, before any gating: at every gating site, the fraction
    of (image, input channel) pairs whose RMS is at most ``rel`` times the site's mean channel RMS.

    Feature decay should raise it; it bounds the MAC cut gating can take almost for free.
    """
    modules = dict(model.named_modules())
    rows: dict[str, list[torch.Tensor]] = {name: [] for name in default_sites(model)}
    hooks = [modules[name].register_forward_pre_hook(
        lambda m, a, name=name: rows[name].append(a[0].float().pow(2).mean((2, 3)).sqrt().cpu()))
        for name in rows]
    seen = 0
    was_training = model.training
    model.eval()
    try:
        for x, _ in first_images(loader, images):
            model(x)
            seen += int(x.shape[0])
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    layers = {}
    for name, r in rows.items():
        r = torch.cat(r)
        layers[name] = float((r <= rel * r.mean()).float().mean()) if r.numel() else 0.0
    return {"images": seen, "rel": rel, "layers": layers,
            "mean_fraction": sum(layers.values()) / len(layers) if layers else 0.0}


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
        saved = dict(ckpt["args"])
        if isinstance(saved.get("distill_from"), str):  # runs saved before --distill-from took a list
            saved["distill_from"] = [saved["distill_from"]]
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
    if not 0.0 <= args.distill_weight <= 1.0:
        raise ConfigError(f"--distill-weight must be in [0, 1], got {args.distill_weight}")
    if not args.distill_temperature > 0.0:
        raise ConfigError(f"--distill-temperature must be > 0, got {args.distill_temperature}")
    if args.feature_decay_ramp < 0 or not args.feature_decay_start >= 0.0:
        raise ConfigError("--feature-decay-ramp and --feature-decay-start must be >= 0, got "
                          f"{args.feature_decay_ramp} and {args.feature_decay_start}")
    if (args.feature_decay_ramp or args.feature_decay_start) and not args.feature_decay:
        raise ConfigError("--feature-decay-ramp/--feature-decay-start shape the weight of "
                          "--feature-decay LAMBDA: pass it too")
    return ckpt, args


def _fit(args: argparse.Namespace, defaults: dict[str, Any]) -> int:
    out = Path(args.out)
    ckpt, args = _resolve_args(args, defaults, out)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(args.device)
    if device.type == "cuda":  # fixed shapes: let cuDNN pick its fastest algorithms once
        torch.backends.cudnn.benchmark = True
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
    channels_last = device.type == "cpu" if args.channels_last is None else args.channels_last
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model.to(memory_format=fmt)
    decay = FeatureDecay(model, args.feature_decay, layers=args.layers) if args.feature_decay else None
    teacher = None
    if args.distill_from:
        teachers = []
        for path in args.distill_from:
            t_model, tmeta = load_checkpoint(path, device=device)
            if tmeta.get("num_classes", num_classes) != num_classes:
                raise ConfigError(f"--distill-from {path!r} predicts {tmeta['num_classes']} "
                                  f"classes, the data has {num_classes}; pass a teacher trained on this data")
            teachers.append(t_model)
        teacher = (teachers[0] if len(teachers) == 1
                   else TeacherEnsemble(teachers, temperature=args.distill_temperature))
        teacher.eval().requires_grad_(False).to(memory_format=fmt)

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

    gate_data = (_subset_loader(data, "train", args.gate_calibration_size, batch_size=256,
                                device=device) if args.gate_keep_ratio else None)
    stop_at = args.epochs if args.stop_after is None else min(args.epochs, start_epoch + args.stop_after)
    for epoch in range(start_epoch, stop_at):
        t0 = time.perf_counter()
        keep = masks = None
        if gate_data is not None:
            keep = _gate_keep_ratio(args, epoch)
            masks = _epoch_gates(model, gate_data, args, keep)
        model.train()
        train_loader.set_epoch(epoch)
        lr = opt.param_groups[0]["lr"]
        # running sums stay on the device (cross-entropy, distillation, decay, correct) and are
        # read every SYNC_EVERY steps: an .item() per step would make a GPU wait for the host
        sums = torch.zeros(4, dtype=torch.float64, device=device)
        zero = torch.zeros((), device=device)
        count, synced = 0, []  # (step, time) at each read: the step rate between them is exact
        bar = _progress(train_loader, desc=f"epoch {epoch + 1}/{args.epochs}", total=steps,
                        enabled=args.progress)
        for i, (x, y) in enumerate(bar):
            if i >= steps:
                break
            out_logits = model(x.contiguous(memory_format=fmt))
            ce = F.cross_entropy(out_logits, y)
            loss, kd, reg = ce, zero, zero
            if teacher is not None:
                with torch.no_grad():
                    target = teacher(x.contiguous(memory_format=fmt))
                kd = distillation_loss(out_logits, target, args.distill_temperature)
                loss = (1.0 - args.distill_weight) * ce + args.distill_weight * kd
            if decay is not None:
                if args.feature_decay_ramp:
                    decay.weight = _decay_weight(args, epoch * steps + i + 1, steps)
                reg = decay.value()
                loss = loss + reg
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                n = y.numel()
                sums += torch.stack([ce.detach() * n, kd.detach() * n, reg.detach() * n,
                                     (out_logits.argmax(1) == y).sum()]).to(sums.dtype)
            count += y.numel()
            if (i + 1) % SYNC_EVERY == 0 or i + 1 == steps:
                loss_sum, distill_sum, decay_sum, correct = sums.tolist()
                synced.append((i + 1, time.perf_counter()))
                if not math.isfinite(loss_sum):
                    raise IspcError(f"training diverged in epoch {epoch + 1} by step {i + 1} "
                                    f"(cross-entropy {loss_sum / count}); lower --lr")
                if hasattr(bar, "set_postfix"):
                    bar.set_postfix(loss=f"{loss_sum / count:.3f}", acc=f"{correct / count:.3f}",
                                    refresh=False)
        loss_sum, distill_sum, decay_sum, correct = sums.tolist()
        if hasattr(bar, "close"):
            bar.close()
        train_seconds = time.perf_counter() - t0
        if decay is not None:
            decay.reset()  # do not keep the last batch's graph alive through evaluation
        gated_acc = None
        if masks is not None:  # the epoch's gates on the test set, then without them
            gated_acc = evaluate(model, test_loader)[1]
            masks.remove()
        test_loss, test_acc = evaluate(model, test_loader)
        record: dict[str, Any] = {"epoch": epoch + 1, "lr": lr, "train_loss": loss_sum / count,
                                  "train_acc": correct / count, "test_loss": test_loss,
                                  "test_acc": test_acc}
        if gated_acc is not None:
            record["test_acc_gated"] = gated_acc
            record["gate_keep_ratio"] = keep
        if decay is not None:
            record["feature_decay"] = decay_sum / count
            record["feature_decay_weight"] = decay.weight
        if teacher is not None:
            record["distill_loss"] = distill_sum / count
        record["seconds"] = time.perf_counter() - t0
        record["train_seconds"] = train_seconds
        record["steps"], record["epoch_steps"] = count // args.batch_size, len(train_loader)
        if len(synced) >= 2:  # steady-state step time, first SYNC_EVERY steps (warm-up) left out
            record["seconds_per_step"] = (synced[-1][1] - synced[0][1]) / (synced[-1][0] - synced[0][0])
        with open(log_path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        print(json.dumps(record), flush=True)
        if decay is not None and decay.weight > 0 and decay_sum == 0.0:
            raise IspcError(f"feature decay drove every regularized feature map to zero in epoch "
                            f"{epoch + 1} (test top-1 {test_acc:.2%}): the network is dead. Raise "
                            "the regularizer gradually (--feature-decay-ramp EPOCHS), start from a "
                            "trained model (finetune), or lower --feature-decay")

        weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
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


class TeacherEnsemble(nn.Module):
    """Several teachers as one: logits whose softened softmax at ``temperature`` is the mean of the
    teachers' softened softmaxes, so :func:`distillation_loss` distils the ensemble's average soft
    targets. Two of the shipped dense ResNet-20s (88.44% and 87.76%) average to 89.02% on the
    CIFAR-10 test set, a stronger teacher than either."""

    def __init__(self, teachers: list[nn.Module], *, temperature: float) -> None:
        super().__init__()
        if not teachers:
            raise ConfigError("a teacher ensemble needs at least one model")
        self.teachers = nn.ModuleList(teachers)
        self.temperature = float(temperature)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.temperature
        logp = torch.stack([F.log_softmax(m(x) / t, dim=1) for m in self.teachers])
        return t * (torch.logsumexp(logp, dim=0) - math.log(len(self.teachers)))


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton et al.'s soft-target loss, T^2 * KL(teacher/T || student/T), batch mean. Feature
    decay alone costs the 88% ResNet-20 about three points of top-1; the dense parent as a teacher
    gives back two of them (the README's CIFAR-10 section)."""
    t = float(temperature)
    return F.kl_div(F.log_softmax(student / t, dim=1), F.log_softmax(teacher / t, dim=1),
                    reduction="batchmean", log_target=True) * (t * t)


def _decay_weight(args: argparse.Namespace, step: int, steps: int) -> float:
    """Feature decay's weight after ``step`` training steps: --feature-decay-start rising linearly
    to --feature-decay over --feature-decay-ramp epochs, then held. At full weight from the first
    step, ResNet-20 trained from scratch (lr 0.2, lambda 3e-4 to 1e-3) lost every feature map in
    its first epoch (an H200 run, README); a ramp lets the features form before they are pruned."""
    start, end = float(args.feature_decay_start), float(args.feature_decay)
    frac = min(1.0, step / max(1, int(args.feature_decay_ramp) * steps))
    return start + (end - start) * frac


def _gate_keep_ratio(args: argparse.Namespace, epoch: int) -> float:
    """This epoch's gate keep ratio: --gate-keep-ratio, reached linearly from 1.0 over the first
    --gate-anneal-epochs epochs. A dense model gated at 50% at once loses most of its accuracy and
    fine-tuning from there can collapse to chance (seen from an 88% ResNet-20); annealing does not."""
    target, anneal = float(args.gate_keep_ratio), int(args.gate_anneal_epochs or 0)
    if anneal <= 0:
        return target
    return 1.0 - (1.0 - target) * min(1.0, (epoch + 1) / anneal)


def _epoch_gates(model: nn.Module, calibration: Any, args: argparse.Namespace, keep: float) -> Any:
    """Gate-aware fine-tuning: calibrate ispc on the current weights (eval-mode copy; thresholds
    for this epoch's keep ratio) and put those gates into the model's forward for this epoch."""
    cfg = ispc.GatingConfig(keep_ratio=keep, mode=args.gate_mode,
                            allocation=args.gate_allocation)
    was_training = model.training
    compiled = ispc.compile(model.eval(), calibration, config=cfg, progress=False)
    model.train(was_training)
    return ispc.GateMasks(model, compiled)


def _cmd_train(args: argparse.Namespace) -> int:
    args.required = ("model", "data", "epochs")
    return _fit(args, _TRAIN_DEFAULTS)


def _cmd_finetune(args: argparse.Namespace) -> int:
    args.required = ("checkpoint", "feature_decay", "data", "epochs")
    return _fit(args, _FINETUNE_DEFAULTS)


# --------------------------------------------------------------------------------------------------
# Weight averaging
# --------------------------------------------------------------------------------------------------

def average_state_dicts(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The uniform mean of the floating-point entries of ``states`` (weights and BatchNorm
    statistics); other entries (``num_batches_tracked``) come from the first. Models fine-tuned from
    one parent sit in one basin, where the mean of their weights is often better than each
    (Wortsman et al. 2022, "model soups"; SWA averages one run's epochs the same way)."""
    if not states:
        raise ConfigError("average needs at least one checkpoint")
    keys = list(states[0])
    out: dict[str, torch.Tensor] = {}
    for i, st in enumerate(states[1:], start=1):
        if list(st) != keys:
            raise ConfigError(f"checkpoint {i + 1} holds other parameters than checkpoint 1 "
                              f"({sorted(set(st) ^ set(keys))[:3]} ...): average only checkpoints of one model")
    for k in keys:
        ref = states[0][k]
        for i, st in enumerate(states[1:], start=1):
            if st[k].shape != ref.shape:
                raise ConfigError(f"{k!r} has shape {tuple(st[k].shape)} in checkpoint {i + 1} and "
                                  f"{tuple(ref.shape)} in checkpoint 1: average only checkpoints of one model")
        if ref.is_floating_point():
            out[k] = torch.stack([st[k].to(torch.float64) for st in states]).mean(0).to(ref.dtype)
        else:
            out[k] = ref.clone()
    return out


def _cmd_average(args: argparse.Namespace) -> int:
    """Average checkpoints' weights, re-estimate BatchNorm statistics on training images, report
    the test top-1 and save a checkpoint ``evaluate`` and ``finetune`` read like any other."""
    if args.bn_images < 0:
        raise ConfigError(f"--bn-images must be >= 0, got {args.bn_images}")
    ckpts = [_torch_load(Path(p)) for p in args.checkpoints]
    names = {(_model_name(c, p), int(c.get("num_classes", 10))) for p, c in zip(args.checkpoints, ckpts)}
    if len(names) != 1:
        raise ConfigError(f"the checkpoints hold different models {sorted(map(str, names))}: "
                          "average only checkpoints of one model")
    (name, num_classes), = names
    device = resolve_device(args.device)
    model = build_model(name, num_classes=num_classes)
    model.load_state_dict(average_state_dicts([c["model"] for c in ckpts]))
    model.to(device)
    data = CIFAR10(args.data, cache_dir=args.cache_dir, progress=args.progress)
    re_estimate = bool(args.bn_images) and any(isinstance(m, nn.modules.batchnorm._BatchNorm)
                                               for m in model.modules())
    if re_estimate:
        # the mean of the weights needs its own statistics: the parents' means and variances do not
        # describe its activations. Augmented training images, as the model saw in training.
        train = data.loader("train", batch_size=args.batch_size, train=True, shuffle=True,
                            seed=args.seed, device=device)
        torch.manual_seed(args.seed)
        torch.optim.swa_utils.update_bn(first_images(train, args.bn_images), model)
    model.eval()
    test = _subset_loader(data, "test", None, batch_size=args.batch_size, device=device)
    top1 = evaluate_top1(model, test)
    for path, c in zip(args.checkpoints, ckpts):
        stored = c.get("top1")
        print(f"  {path}: " + ("no stored top-1" if stored is None else f"{100 * stored:.2f}% (stored)"))
    bn = (f"BatchNorm re-estimated on {args.bn_images} training images" if re_estimate
          else "BatchNorm statistics averaged")
    print(f"average of {len(ckpts)} checkpoints, {bn}: dense test top-1 {100 * top1:.2f}%", flush=True)
    decays = {c.get("feature_decay") for c in ckpts}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _save({"model_name": name, "num_classes": num_classes, "classes": ckpts[0].get("classes"),
           "command": shlex.join([sys.argv[0], *args.argv]), "parents": list(args.checkpoints),
           "parent": args.checkpoints[0], "feature_decay": decays.pop() if len(decays) == 1 else None,
           "bn_images": args.bn_images if re_estimate else 0, "top1": top1,
           "model": {k: v.detach().cpu() for k, v in model.state_dict().items()}}, out)
    print(f"wrote {out}")
    return 0


# --------------------------------------------------------------------------------------------------
# Evaluation of ispc against dense and static pruning
# --------------------------------------------------------------------------------------------------

#: where ``evaluate`` looks for a checkpoint when none is given (fine-tuned first, then dense)
DEFAULT_CHECKPOINTS = ("checkpoints/resnet20_fd_ramp.pt", "checkpoints/resnet20_fd_kd3.pt",
                       "checkpoints/resnet20_fd_kd2.pt",
                       "checkpoints/resnet20_fd.pt", "checkpoints/resnet20_dense.pt")
#: the layer-level check of the CV rationale runs at the threshold point nearest this keep ratio
CV_CHECK_KEEP = 0.5


def _default_checkpoint() -> str:
    """The first of :data:`DEFAULT_CHECKPOINTS` that exists (the best feature-decay model first),
    in the working directory first (a user's own checkpoints win), then in the checkout holding
    this script."""
    roots = [Path.cwd(), Path(__file__).resolve().parents[1]]
    for root in roots:
        for rel in DEFAULT_CHECKPOINTS:
            if (root / rel).is_file():
                return str(root / rel)
    return DEFAULT_CHECKPOINTS[-1]


def _subset_loader(data: CIFAR10, split: str, n: int | None, *, batch_size: int,
                   device: torch.device, seed: int = 0, shuffled: bool = False) -> Any:
    """Batches of ``n`` images of ``split`` (all when ``n`` is None), without augmentation.

    The stored splits are sorted by class, so a subset is the first ``n`` of a fixed
    (``seed``-determined) shuffle: every class is represented, and runs are reproducible. With
    ``shuffled`` the images also stay in that shuffled order, so that any prefix of the loader (what
    the per-layer checks read) is a class-balanced sample too.
    """
    x, y = data.arrays(split)
    x, y = torch.from_numpy(x), torch.from_numpy(y)
    if shuffled or (n is not None and n < x.shape[0]):
        idx = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:n]
        idx = idx if shuffled else idx.sort().values
        x, y = x[idx], y[idx]
    return CIFAR10Loader(x, y, batch_size=batch_size, train=False, shuffle=False, seed=seed,
                         device=device, drop_last=False, mean=data.mean, std=data.std)


def spearman(a: list[float], b: list[float]) -> float | None:
    """Spearman rank correlation (ties get average ranks); None for fewer than 3 pairs or a
    constant input."""
    if len(a) != len(b) or len(a) < 3:
        return None

    def ranks(v: list[float]) -> torch.Tensor:
        t = torch.tensor(v, dtype=torch.float64)
        order = torch.argsort(t, stable=True)
        r = torch.empty_like(t)
        r[order] = torch.arange(len(v), dtype=torch.float64)
        for value in t.unique():  # average ranks of ties
            tie = t == value
            r[tie] = r[tie].mean()
        return r

    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / denom if denom > 0 else None


@torch.no_grad()
def static_error_check(compiled: nn.Module, static: nn.Module, loader: Iterable[Any], *,
                       images: int = 256, progress: bool = True) -> dict[str, Any]:
    """Per gated layer: its CV and how much the static mask changes the layer's output.

    For every gated layer of ``compiled`` that ``static`` prunes too, a hook compares on the same
    input ``x`` the layer's output ``module(x)`` (dynamic, per-input mask) with the convolution of
    ``x`` under the static model's fixed mask: ``static_error`` is the mean over images of
    ``||y_static - y_dynamic|| / ||y_dynamic||``. Also recorded against the dense output of the same
    ``x``: ``static_error_dense`` and ``dynamic_error_dense``. The Spearman correlation of CV with
    ``static_error`` (``spearman``) tests the rationale "high CV => static pruning loses more".
    """
    gated = {n: m for n, m in compiled.graph_module.named_modules() if isinstance(m, GatedConv2d)}
    statics = static.static_modules()
    names = [n for n in gated if n in statics]
    sums = {n: torch.zeros(3, dtype=torch.float64) for n in names}

    def rel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return ((a - b).flatten(1).norm(dim=1) / b.flatten(1).norm(dim=1).clamp_min(1e-12)).double()

    def hook(m: GatedConv2d, args: tuple, out: torch.Tensor, name: str) -> None:
        x = args[0]
        mask = torch.zeros(m.in_channels, dtype=x.dtype, device=x.device)
        mask[statics[name].index.to(x.device)] = 1
        conv = lambda inp: F.conv2d(inp, m.weight, m.bias, m.stride, m.padding, m.dilation)  # noqa: E731
        y_static, y_dense = conv(x * mask.view(1, -1, 1, 1)), conv(x)
        sums[name] += torch.stack([rel(y_static, out).sum(), rel(y_static, y_dense).sum(),
                                   rel(out, y_dense).sum()]).cpu()

    hooks = [gated[n].register_forward_hook(lambda mod, a, o, n=n: hook(mod, a, o, n)) for n in names]
    seen = 0
    try:
        for x, _ in _progress(first_images(loader, images), desc="cv check", total=None,
                              enabled=progress):
            compiled(x)
            seen += int(x.shape[0])
    finally:
        for h in hooks:
            h.remove()
    rows = []
    for n in names:
        s = (sums[n] / max(seen, 1)).tolist()
        rows.append({"layer": n, "cv": compiled.report.layer(n).cv, "static_error": s[0],
                     "static_error_dense": s[1], "dynamic_error_dense": s[2]})
    cvs = [r["cv"] for r in rows]
    return {
        "images": seen,
        "metric": "static_error = mean over images of ||conv(x * static_mask) - gated_conv(x)|| / "
                  "||gated_conv(x)|| at each gated layer's actual input x (l2 over the output tensor)",
        "layers": rows,
        "spearman": spearman(cvs, [r["static_error"] for r in rows]),
        "spearman_excess": spearman(cvs, [r["static_error_dense"] - r["dynamic_error_dense"]
                                          for r in rows]),
    }


@torch.no_grad()
def single_layer_check(compiled: nn.Module, loader: Iterable[Any], *, images: int = 1000,
                       progress: bool = True) -> dict[str, Any]:
    """Per gated layer, alone: top-1 with only that layer gated per input vs statically pruned.

    Every other gated layer runs dense. The static variant keeps, for every input, the layer's
    ``round(kept * C)`` channels with the highest mean calibration saliency, where ``kept`` is the
    fraction the dynamic gate kept on these images: same MACs, same layer. ``gain`` = dynamic
    top-1 - static top-1. The paper's rationale predicts that gain grows with the layer's CV;
    ``spearman`` (CV vs gain) checks it on accuracy, the quantity that matters.
    """
    gm = compiled.graph_module
    gated = compiled.gated_modules()
    stats = {n.target: records(n).stats for n in gm.graph.nodes
             if n.op == "call_module" and n.target in gated}
    batches = list(first_images(loader, images))
    seen = sum(int(x.shape[0]) for x, _ in batches)

    def top1() -> float:
        return sum(int((gm(x).argmax(1) == y).sum()) for x, y in batches) / max(seen, 1)

    saved = {n: (m.mode, m.threshold) for n, m in gated.items()}
    rows = []
    try:
        for m in gated.values():
            m.mode, m.threshold = "threshold", 0.0  # keep every channel: dense
        dense = top1()
        for name in _progress(list(gated), desc="single-layer check", total=len(gated), enabled=progress):
            m = gated[name]
            m.mode, m.threshold = saved[name]
            kept: list[torch.Tensor] = []
            hook = m.register_forward_pre_hook(lambda mod, a: kept.append(mod.kept_mask(a[0]).float().mean(1)))
            try:
                dynamic = top1()
            finally:
                hook.remove()
            m.mode, m.threshold = "threshold", 0.0
            fraction = float(torch.cat(kept).mean())
            k = kept_count(fraction, m.in_channels)  # rounded as static_prune rounds
            mask = torch.zeros(m.in_channels)
            mask[static_channels(stats[name], k)] = 1
            hook = m.register_forward_pre_hook(
                lambda mod, a, mask=mask: (a[0] * mask.to(a[0]).view(1, -1, 1, 1),))
            try:
                static = top1()
            finally:
                hook.remove()
            rows.append({"layer": name, "cv": compiled.report.layer(name).cv, "kept_fraction": fraction,
                         "dynamic_top1": dynamic, "static_top1": static, "gain": dynamic - static})
    finally:
        for n, m in gated.items():
            m.mode, m.threshold = saved[n]
    return {"images": seen, "dense_top1": dense, "layers": rows,
            "spearman": spearman([r["cv"] for r in rows], [r["gain"] for r in rows])}


#: test images the batch-1 speed-ups cycle through (the gates' sparsity, and so the speed, is
#: that of real images, not of random inputs)
SPEED_IMAGES = 64


def _speed_inputs(test: Iterable[Any], count: int = SPEED_IMAGES) -> torch.Tensor:
    """The first ``count`` images of ``test`` (batches of ``(images, labels)`` or of images)."""
    got, seen = [], 0
    for batch in test:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        got.append(x[:count - seen])
        seen += got[-1].shape[0]
        if seen >= count:
            break
    return torch.cat(got)


def _speedup_b1(model: nn.Module, candidate: nn.Module, rounds: int, progress: bool,
                inputs: torch.Tensor) -> float:
    return float(benchmark(model, candidate, batch_sizes=(1,), rounds=rounds, progress=progress,
                           inputs=inputs)[0].realized_speedup)


def sparsity_sweep(model: nn.Module, calibration: Iterable[Any], test: Iterable[Any], *,
                   keep_ratios: Iterable[float] = (0.3, 0.4, 0.5, 0.6, 0.7),
                   modes: Iterable[str] = ("threshold", "topk"),
                   allocations: Iterable[str] = ("layer",), saliency: str = "l2",
                   speed_rounds: int = 64, cv_images: int = 256, layer_images: int = 1000,
                   check_data: Iterable[Any] | None = None, progress: bool = True) -> dict[str, Any]:
    """ispc at each (mode, allocation, keep ratio), and static pruning matched to each
    threshold-mode point.

    Every point: top-1 (fraction) on ``test``, ``mac_reduction`` from MACs actually executed on
    ``test`` against dense, and the realized batch-1 speed-up against the BN-folded dense model.
    Static points keep, per layer, the same fraction of channels the ispc point kept on average
    on ``test`` (from ``measure()``), so both run at (nearly) the same MACs.
    """
    check_data = test if check_data is None else check_data
    keep_ratios, modes, allocations = [float(r) for r in keep_ratios], list(modes), list(allocations)
    grid = [(m, a, r) for m in modes for a in allocations for r in keep_ratios]
    thr = [(a, r) for m, a, r in grid if m == "threshold"]
    check_at = min(thr, key=lambda ar: (abs(ar[1] - CV_CHECK_KEEP), ar[0] != "layer", ar[1])) \
        if thr else None
    points: list[dict[str, Any]] = []
    cv_check: dict[str, Any] | None = None
    speed_inputs = _speed_inputs(test)
    for mode, alloc, ratio in _progress(grid, desc="ispc vs static", total=len(grid), enabled=progress):
        cfg = ispc.GatingConfig(keep_ratio=ratio, mode=mode, allocation=alloc, saliency=saliency)
        fast = ispc.compile(model, calibration, config=cfg, progress=progress).eval()
        measured = fast.measure(test, progress=progress)
        points.append({"method": "ispc", "mode": mode, "allocation": alloc, "keep_ratio": ratio,
                       "top1": evaluate_top1(fast, test), "mac_reduction": measured["mac_reduction"],
                       "speedup_b1": _speedup_b1(model, fast, speed_rounds, progress,
                                                 speed_inputs)})
        if mode != "threshold":
            continue
        fractions = {n: v["kept_fraction"] for n, v in measured["layers"].items()}
        static = static_prune(model, calibration, keep_fractions=fractions, config=cfg,
                              match_mac_reduction=measured["mac_reduction"], progress=progress).eval()
        points.append({"method": "static", "mode": mode, "allocation": alloc, "keep_ratio": ratio,
                       "top1": evaluate_top1(static, test),
                       "mac_reduction": static.measure(test, progress=progress)["mac_reduction"],
                       "speedup_b1": _speedup_b1(model, static, speed_rounds, progress,
                                                     speed_inputs)})
        if (alloc, ratio) == check_at:
            # the per-layer checks compare one layer's output and turn gates on and off: they need
            # every layer whole (no channel pruned from producers) and without fused epilogues
            whole = ispc.compile(model, calibration, progress=progress,
                                 config=cfg.replace(prune_dead=False, fuse_epilogues=False)).eval()
            cv_check = {"mode": mode, "allocation": alloc, "keep_ratio": ratio,
                        **static_error_check(whole, static, check_data, images=cv_images,
                                             progress=progress),
                        "single_layer": single_layer_check(whole, check_data, images=layer_images,
                                                           progress=progress)}
    return {"points": points, "cv_check": cv_check}


def plot_sweep(result: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Top-1 against MAC reduction: ispc and static curves per mode, dense as a horizontal line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scale = 100.0 if result.get("top1_unit", "fraction") == "fraction" else 1.0
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    palette = ["#2b6cb0", "#c05621", "#2f855a", "#6b46c1", "#b7791f", "#c53030"]
    curves = list(dict.fromkeys((p["mode"], p.get("allocation", "layer")) for p in result["points"]))
    for color, (mode, alloc) in zip(palette * 2, curves):
        name = mode if alloc == "layer" else f"{mode}, {alloc}"
        for method, style, marker in (("ispc", "-", "o"), ("static", "--", "s")):
            pts = sorted((p for p in result["points"] if p["mode"] == mode and p["method"] == method
                          and p.get("allocation", "layer") == alloc), key=lambda p: p["mac_reduction"])
            if pts:
                ax.plot([100 * p["mac_reduction"] for p in pts], [scale * p["top1"] for p in pts],
                        linestyle=style, marker=marker, color=color,
                        label=f"ispc ({name})" if method == "ispc" else f"static (matched to {name})")
    ax.axhline(scale * result["dense_top1"], color="black", linewidth=1, linestyle=":",
               label=f"dense ({scale * result['dense_top1']:.2f}%)")
    ax.set_xlabel("MAC reduction executed on the test images (%)")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(f"{result.get('model', '')}: instance-wise (ispc) vs static pruning")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _sweep_tables(result: dict[str, Any]) -> str:
    from tabulate import tabulate

    rows = [[p["method"], p["mode"], p.get("allocation", "layer"), f"{p['keep_ratio']:g}", f"{100 * p['top1']:.2f}",
             f"{100 * (p['top1'] - result['dense_top1']):+.2f}", f"{100 * p['mac_reduction']:.1f}%",
             f"{p['speedup_b1']:.2f}x"] for p in result["points"]]
    text = tabulate(rows, headers=["method", "mode", "allocation", "keep", "top-1 %", "vs dense", "MAC cut",
                                   "speed-up b1"], tablefmt="simple", disable_numparse=True)
    check = result.get("cv_check")
    if check:
        rows = [[r["layer"], f"{r['cv']:.3f}" if r["cv"] is not None else "-",
                 f"{r['static_error']:.4f}", f"{r['static_error_dense']:.4f}",
                 f"{r['dynamic_error_dense']:.4f}"] for r in check["layers"]]
        rho = check["spearman"]
        text += (f"\n\nCV check at {check['mode']} keep {check['keep_ratio']:g} on {check['images']} "
                 "images (rel. output error of each gated layer)\n"
                 + tabulate(rows, headers=["layer", "CV", "static vs dynamic", "static vs dense",
                                           "dynamic vs dense"], tablefmt="simple", disable_numparse=True)
                 + f"\nSpearman(CV, static vs dynamic error) = "
                 + (f"{rho:+.3f}" if rho is not None else "n/a (fewer than 3 layers)"))
        single = check.get("single_layer")
        if single:
            rows = [[r["layer"], f"{r['cv']:.3f}" if r["cv"] is not None else "-",
                     f"{100 * r['kept_fraction']:.0f}%", f"{100 * r['dynamic_top1']:.2f}",
                     f"{100 * r['static_top1']:.2f}", f"{100 * r['gain']:+.2f}"] for r in single["layers"]]
            rho = single["spearman"]
            text += (f"\n\nOne layer gated at a time ({single['images']} images, dense "
                     f"{100 * single['dense_top1']:.2f}%): ispc vs static at the same kept count\n"
                     + tabulate(rows, headers=["layer", "CV", "kept", "ispc top-1", "static top-1",
                                               "ispc - static"], tablefmt="simple", disable_numparse=True)
                     + "\nSpearman(CV, ispc - static top-1) = "
                     + (f"{rho:+.3f}" if rho is not None else "n/a (fewer than 3 layers)"))
    return text


def _cmd_evaluate(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    checkpoint = args.checkpoint or _default_checkpoint()
    model, meta = load_checkpoint(checkpoint, device=device)
    model.eval()
    data = CIFAR10(args.data, cache_dir=args.cache_dir, progress=args.progress)
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit must be >= 1, got {args.limit}")
    if args.calibration_size < 1:
        raise ConfigError(f"--calibration-size must be >= 1, got {args.calibration_size}")
    test = _subset_loader(data, "test", args.limit, batch_size=args.batch_size, device=device)
    top1 = evaluate_top1(model, test)
    print(f"{meta['model_name']} {checkpoint}: dense test top-1 {100 * top1:.2f}% "
          f"({test.images.shape[0]} test images)", flush=True)
    # the checks read the first images of their loader: a fixed shuffle, so every class is in them
    # (the stored test split is sorted by class)
    checks = _subset_loader(data, "test", max(args.cv_images, args.layer_images),
                            batch_size=args.batch_size, device=device, seed=1, shuffled=True)
    sparse = negligible_channels(model, checks, images=args.layer_images)
    print(f"negligible channels before gating (RMS <= {sparse['rel']:g} x layer mean, "
          f"{sparse['images']} images): {100 * sparse['mean_fraction']:.1f}% on average over "
          f"{len(sparse['layers'])} gating sites", flush=True)
    if args.dense_only:
        return 0
    bad = [r for r in args.keep_ratios if not 0.0 < r <= 1.0]
    if bad:
        raise ConfigError(f"--keep-ratios must be in (0, 1], got {bad}")
    calibration = _subset_loader(data, "train", args.calibration_size, batch_size=args.batch_size,
                                 device=device)
    sweep = sparsity_sweep(model, calibration, test, keep_ratios=args.keep_ratios, modes=args.modes,
                           allocations=args.allocations, saliency=args.saliency,
                           speed_rounds=args.speed_rounds, cv_images=args.cv_images,
                           layer_images=args.layer_images, check_data=checks,
                           progress=args.progress)
    result = {"model": meta["model_name"], "checkpoint": str(checkpoint), "top1_unit": "fraction",
              "dense_top1": top1, "test_images": int(test.images.shape[0]),
              "negligible_channels": sparse,
              "calibration_images": int(calibration.images.shape[0]),
              "calibration": "train split, first --calibration-size images of a fixed shuffle "
                             "(seed 0), no augmentation",
              "saliency": args.saliency, "threads": torch.get_num_threads(), "device": str(device), **sweep}
    print(_sweep_tables(result))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    if args.plot:
        print(f"wrote {plot_sweep(result, args.plot)}")
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
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="train in channels-last memory format (default: on for the CPU, where oneDNN's "
                        "training convolutions run about 1.5x faster in it)")


def _regularizer_options(p: argparse.ArgumentParser) -> None:
    """Feature decay and distillation: for ``finetune``, and for ``train`` from scratch (a long
    run with the regularizer throughout, which a GPU makes affordable)."""
    p.add_argument("--feature-decay", type=float, metavar="LAMBDA", help="weight of the regularizer")
    p.add_argument("--feature-decay-ramp", type=int, default=None, metavar="E",
                   help="raise the weight linearly (per step) to LAMBDA over the first E epochs "
                        "(default 0: LAMBDA from the start; from scratch, use one)")
    p.add_argument("--feature-decay-start", type=float, default=None, metavar="L0",
                   help="the weight the ramp starts from (default 0)")
    p.add_argument("--layers", nargs="+", default=None,
                   help="module names whose inputs are regularized (default: dense convs with >= 16 inputs)")
    p.add_argument("--distill-from", nargs="+", default=None, metavar="CKPT",
                   help="knowledge distillation: trained checkpoints (e.g. the dense parent) whose "
                        "softened predictions, averaged over the checkpoints given, the trained "
                        "model also learns; default: off")
    p.add_argument("--distill-weight", type=float, default=None, metavar="A",
                   help="loss = (1-A) * cross-entropy + A * distillation (default 0.9)")
    p.add_argument("--distill-temperature", type=float, default=None, metavar="T",
                   help="softmax temperature of the distillation term (default 4)")


def build_parser() -> argparse.ArgumentParser:
    """The ``train`` / ``finetune`` / ``average`` / ``evaluate`` command line."""
    parser = argparse.ArgumentParser(prog="cifar.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model from scratch")
    p.add_argument("--model", help="resnet20, resnet56, vgg16_cifar, mobilenet_v2_cifar, ... "
                                   "or package.module:factory")
    _regularizer_options(p)
    _fit_options(p, _TRAIN_DEFAULTS)
    p.set_defaults(func=_cmd_train, checkpoint=None, gate_keep_ratio=None, gate_mode=None,
                   gate_allocation=None, gate_calibration_size=None, gate_anneal_epochs=None)

    p = sub.add_parser("finetune", help="fine-tune a trained checkpoint with feature decay")
    p.add_argument("--checkpoint", help="best.pt/final.pt of a trained run")
    p.add_argument("--gate-keep-ratio", type=float, default=None, metavar="R",
                   help="gate-aware fine-tuning: each epoch, calibrate ispc at this keep ratio and "
                        "train with its gates in the forward pass (ispc.GateMasks); default: off")
    p.add_argument("--gate-mode", choices=("threshold", "topk"), default=None,
                   help="gating mode of --gate-keep-ratio (default threshold)")
    p.add_argument("--gate-allocation", choices=("layer", "global"), default=None,
                   help="allocation of --gate-keep-ratio (default global)")
    p.add_argument("--gate-anneal-epochs", type=int, default=None, metavar="E",
                   help="reach --gate-keep-ratio linearly from 1.0 over the first E epochs (default 0: "
                        "at once; use it when fine-tuning a dense model)")
    p.add_argument("--gate-calibration-size", type=int, default=2048,
                   help="training images (no augmentation) the gates are calibrated on each epoch")
    _regularizer_options(p)
    _fit_options(p, _FINETUNE_DEFAULTS)
    p.set_defaults(func=_cmd_finetune, model=None)

    p = sub.add_parser("average", help="average the weights of checkpoints of one model (a model "
                                       "soup, or SWA over a run's epochs), re-estimate BatchNorm, "
                                       "report the test top-1")
    p.add_argument("checkpoints", nargs="+", metavar="CKPT",
                   help="checkpoints of one model, best fine-tuned from one parent")
    p.add_argument("--out", required=True, help="the averaged checkpoint (.pt)")
    p.add_argument("--bn-images", type=int, default=50000,
                   help="augmented training images BatchNorm statistics are re-estimated on "
                        "(default 50000: the training set; 0 keeps the averaged statistics)")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--seed", type=int, default=0, help="augmentation and order of those images")
    _common(p)
    p.set_defaults(func=_cmd_average)

    p = sub.add_parser("evaluate", help="dense test top-1, then ispc vs static pruning at several "
                                        "keep ratios (top-1, MAC reduction, batch-1 speed-up)")
    p.add_argument("--checkpoint", default=None,
                   help=f"best.pt/final.pt of a run (default {DEFAULT_CHECKPOINTS[0]} if it exists, "
                        f"else {DEFAULT_CHECKPOINTS[1]})")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--json", default=None, metavar="OUT", help="write the results as JSON here")
    p.add_argument("--plot", default=None, metavar="OUT.png",
                   help="save accuracy vs MAC reduction here (needs matplotlib)")
    p.add_argument("--keep-ratios", type=float, nargs="+", default=[0.3, 0.4, 0.5, 0.6, 0.7])
    p.add_argument("--modes", nargs="+", choices=("threshold", "topk"), default=["threshold", "topk"])
    p.add_argument("--allocations", nargs="+", choices=("layer", "global"), default=["layer", "global"],
                   help="how keep ratios are spread over layers (GatingConfig.allocation)")
    p.add_argument("--saliency", choices=("l2", "l1", "weighted_l2"), default="l2",
                   help="per-instance channel importance (GatingConfig.saliency)")
    p.add_argument("--calibration-size", type=int, default=2048,
                   help="training images ispc calibrates on (default 2048)")
    p.add_argument("--limit", type=int, default=None,
                   help="evaluate on this many test images (a fixed subset; default all)")
    p.add_argument("--speed-rounds", type=int, default=64,
                   help="timing rounds at batch 1 (each on the next of the first 64 test images)")
    p.add_argument("--cv-images", type=int, default=256,
                   help="test images for the per-layer CV vs static-error check")
    p.add_argument("--layer-images", type=int, default=1000,
                   help="test images for the single-layer dynamic-vs-static accuracy check")
    p.add_argument("--dense-only", action="store_true", help="only the dense top-1")
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
        if args.command in ("evaluate", "average") and not args.data:
            raise ConfigError(f"{args.command} needs --data")
        return int(args.func(args))
    except IspcError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
