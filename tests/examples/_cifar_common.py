"""Shared fixtures for the examples/cifar.py tests: the script as a module, fake CIFAR folders."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "examples" / "cifar.py"
HERE = Path(__file__).resolve().parent
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def load_script(name: str):
    """examples/cifar.py as a module (loaded from its file, as a checkout without install runs it);
    yields it and restores the thread count its ``main(--threads)`` changes."""
    spec = importlib.util.spec_from_file_location(name, SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    threads = torch.get_num_threads()
    yield module
    torch.set_num_threads(threads)


def make_fake_cifar(root: Path, *, train: int, test: int, spread: int, step: int) -> Path:
    """A CIFAR-layout folder of PNGs; class k's images are brighter (``step * k``) so it is learnable."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", train), ("test", test)):
        for k, cls in enumerate(CLASSES):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                arr = rng.integers(0, spread, (32, 32, 3)) + step * k
                Image.fromarray(arr.astype(np.uint8)).save(root / split / cls / f"{i:04d}.png")
    return root
