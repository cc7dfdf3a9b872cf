"""``train`` and ``finetune``: a model from scratch, or a trained checkpoint fine-tuned with the
feature-decay regularizer, optionally distilled from teachers and with ispc's gates in the loop.

Runs are resumable, and on the CPU exactly reproducible, from ``last.pt``: each epoch's data order
depends only on (seed, epoch).
"""
from __future__ import annotations

import argparse
import json
import math
import random
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import ispc
from ispc.datasets import CIFAR10
from ispc.errors import ConfigError, IspcError
from ispc.feature_decay import FeatureDecay

from .common import (add_common_options, build_model, evaluate, load_checkpoint, progress_bar,
                     read_checkpoint, resolve_device, save_atomic, subset_loader)

__all__ = ["TeacherEnsemble", "distillation_loss", "decay_weight", "gate_keep_ratio", "add_parsers",
           "SYNC_EVERY"]

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


def _resolve_args(args: argparse.Namespace, defaults: dict[str, Any], out: Path) -> tuple[dict[str, Any] | None, argparse.Namespace]:
    """Fill defaults; on ``--resume`` take the run's own settings, refusing contradicting ones."""
    last = out / "last.pt"
    ckpt = None
    if args.resume and last.exists():
        ckpt = read_checkpoint(last)
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

    gate_data = (subset_loader(data, "train", args.gate_calibration_size, batch_size=256,
                                device=device) if args.gate_keep_ratio else None)
    stop_at = args.epochs if args.stop_after is None else min(args.epochs, start_epoch + args.stop_after)
    for epoch in range(start_epoch, stop_at):
        t0 = time.perf_counter()
        keep = masks = None
        if gate_data is not None:
            keep = gate_keep_ratio(args, epoch)
            masks = _epoch_gates(model, gate_data, args, keep)
        model.train()
        train_loader.set_epoch(epoch)
        lr = opt.param_groups[0]["lr"]
        # running sums stay on the device (cross-entropy, distillation, decay, correct) and are
        # read every SYNC_EVERY steps: an .item() per step would make a GPU wait for the host
        sums = torch.zeros(4, dtype=torch.float64, device=device)
        zero = torch.zeros((), device=device)
        count, synced = 0, []  # (step, time) at each read: the step rate between them is exact
        bar = progress_bar(train_loader, desc=f"epoch {epoch + 1}/{args.epochs}", total=steps,
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
                    decay.weight = decay_weight(args, epoch * steps + i + 1, steps)
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
            save_atomic({**meta, "model": weights, "top1": test_acc, "epoch": epoch + 1}, out / "best.pt")
        save_atomic({**meta, "model": weights, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
               "epoch": epoch + 1, "best_top1": best, "top1": test_acc, "rng": _rng_state()},
              out / "last.pt")
        if epoch + 1 == args.epochs:
            save_atomic({**meta, "model": weights, "top1": test_acc, "epoch": epoch + 1}, out / "final.pt")
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


def decay_weight(args: argparse.Namespace, step: int, steps: int) -> float:
    """Feature decay's weight after ``step`` training steps: --feature-decay-start rising linearly
    to --feature-decay over --feature-decay-ramp epochs, then held. At full weight from the first
    step, ResNet-20 trained from scratch (lr 0.2, lambda 3e-4 to 1e-3) lost every feature map in
    its first epoch (an H200 run, README); a ramp lets the features form before they are pruned."""
    start, end = float(args.feature_decay_start), float(args.feature_decay)
    frac = min(1.0, step / max(1, int(args.feature_decay_ramp) * steps))
    return start + (end - start) * frac


def gate_keep_ratio(args: argparse.Namespace, epoch: int) -> float:
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


def _fit_options(p: argparse.ArgumentParser, defaults: dict[str, Any]) -> None:
    add_common_options(p)
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


def add_parsers(sub: Any) -> None:
    """The ``train`` and ``finetune`` commands."""
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
