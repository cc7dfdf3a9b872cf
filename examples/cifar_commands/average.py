"""``average``: the mean of checkpoints' weights (a model soup of runs fine-tuned from one parent,
or SWA over one run's last epochs), BatchNorm re-estimated on training images."""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ispc.datasets import CIFAR10
from ispc.errors import ConfigError

from .common import (add_common_options, build_model, checkpoint_model, evaluate_top1, first_images,
                     read_checkpoint, resolve_device, save_atomic, subset_loader)

__all__ = ["average_state_dicts", "add_parser"]


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
    ckpts = [read_checkpoint(Path(p)) for p in args.checkpoints]
    names = {(checkpoint_model(c, p), int(c.get("num_classes", 10))) for p, c in zip(args.checkpoints, ckpts)}
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
    test = subset_loader(data, "test", None, batch_size=args.batch_size, device=device)
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
    save_atomic({"model_name": name, "num_classes": num_classes, "classes": ckpts[0].get("classes"),
           "command": shlex.join([sys.argv[0], *args.argv]), "parents": list(args.checkpoints),
           "parent": args.checkpoints[0], "feature_decay": decays.pop() if len(decays) == 1 else None,
           "bn_images": args.bn_images if re_estimate else 0, "top1": top1,
           "model": {k: v.detach().cpu() for k, v in model.state_dict().items()}}, out)
    print(f"wrote {out}")
    return 0


def add_parser(sub: Any) -> None:
    """The ``average`` command."""
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
    add_common_options(p)
    p.set_defaults(func=_cmd_average)
