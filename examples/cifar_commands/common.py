"""What the CIFAR-10 commands share: models, checkpoints, data subsets, evaluation, options."""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ispc.datasets import CIFAR10, CIFAR10Loader
from ispc.errors import ConfigError

try:
    from ispc.examples.models import create_model
except ImportError:  # ispc not installed: the checkout's folder
    from examples.models import create_model

__all__ = ["build_model", "resolve_device", "read_checkpoint", "checkpoint_model", "load_checkpoint",
           "save_atomic", "evaluate", "evaluate_top1", "first_images", "subset_loader",
           "progress_bar", "add_common_options"]


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


def read_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint written by these commands (tensors and plain containers only)."""
    if not path.is_file():
        raise ConfigError(f"checkpoint {str(path)!r} does not exist")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(obj, dict) or "model" not in obj:
        raise ConfigError(f"{str(path)!r} is not a checkpoint written by examples/cifar.py")
    return obj


def checkpoint_model(ckpt: dict[str, Any], path: str | os.PathLike[str]) -> str:
    """The model a checkpoint holds (runs written before ``model_name`` say it in their args)."""
    name = ckpt.get("model_name") or ckpt.get("args", {}).get("model")
    if not name:
        raise ConfigError(f"{str(path)!r} does not say which model it holds (no 'model_name')")
    return name


def load_checkpoint(path: str | os.PathLike[str], *, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """The model of a ``best.pt``/``final.pt``/``last.pt`` and the checkpoint's metadata."""
    ckpt = read_checkpoint(Path(path))
    name = checkpoint_model(ckpt, path)
    model = build_model(name, num_classes=int(ckpt.get("num_classes", 10)))
    model.load_state_dict(ckpt["model"])
    meta = {k: v for k, v in ckpt.items() if k not in ("model", "optimizer", "scheduler", "rng")}
    meta["model_name"] = name
    return model.to(device), meta


#: where ``evaluate`` and ``tune`` look for a checkpoint when none is given (fine-tuned first, then dense)
DEFAULT_CHECKPOINTS = ("checkpoints/resnet20_fd_ramp.pt", "checkpoints/resnet20_dense.pt")


def default_checkpoint() -> str:
    """The first of :data:`DEFAULT_CHECKPOINTS` that exists (the best feature-decay model first),
    in the working directory first (a user's own checkpoints win), then in the checkout holding
    this script."""
    roots = [Path.cwd(), Path(__file__).resolve().parents[2]]
    for root in roots:
        for rel in DEFAULT_CHECKPOINTS:
            if (root / rel).is_file():
                return str(root / rel)
    return DEFAULT_CHECKPOINTS[-1]


def open_checkpoint(args: argparse.Namespace) -> tuple[torch.device, str, nn.Module, dict[str, Any], CIFAR10]:
    """What ``evaluate`` and ``tune`` start from: the device, the checkpoint (``--checkpoint`` or
    the shipped default), its model in eval mode there, its metadata, and the dataset."""
    device = resolve_device(args.device)
    checkpoint = args.checkpoint or default_checkpoint()
    model, meta = load_checkpoint(checkpoint, device=device)
    model.eval()
    data = CIFAR10(args.data, cache_dir=args.cache_dir, progress=args.progress)
    return device, checkpoint, model, meta, data


def save_atomic(obj: dict[str, Any], path: Path) -> None:
    """Write atomically, so an interrupted run never leaves half a checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


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


def subset_loader(data: CIFAR10, split: str, n: int | None, *, batch_size: int,
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


def progress_bar(iterable: Iterable[Any], *, desc: str, total: int, enabled: bool) -> Any:
    interactive = sys.stderr.isatty()
    return tqdm(iterable, desc=desc, total=total, disable=not enabled, dynamic_ncols=interactive,
                mininterval=0.5 if interactive else 30.0, leave=interactive)


def add_common_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", help="cifar10-jpeg.tar.gz or a folder with train/<class>/ and test/<class>/")
    p.add_argument("--cache-dir", default=None,
                   help="where decoded images are cached (default $ISPC_CACHE_DIR or ~/.cache/ispc)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
