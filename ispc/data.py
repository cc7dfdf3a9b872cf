"""Turning what users pass as calibration data into a checked stream of input tensors."""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor

from .errors import DataError

__all__ = ["as_input", "iter_inputs", "DEFAULT_SPLIT"]

#: a single tensor given as calibration data is split into batches of this many inputs
DEFAULT_SPLIT = 64


def as_input(batch: Any, index: int, *, device: torch.device | None = None,
             dtype: torch.dtype | None = None) -> Tensor:
    """The input tensor of one batch: the batch itself or the first item of a tuple/list.

    Floating batches are moved to the model's device and floating dtype. Integer tensors (e.g.
    uint8 images) are refused: their scaling and normalization must match training, which ispc
    cannot know.
    """
    if isinstance(batch, Tensor):
        x = batch
    elif isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        x = batch[0]
    elif isinstance(batch, Mapping):
        raise DataError(f"calibration batch {index} is a mapping with keys {sorted(map(str, batch))}; "
                        "ispc feeds one positional input tensor: pass a generator yielding the input "
                        "tensor, e.g. (b['pixel_values'] for b in loader)")
    else:
        raise DataError(f"calibration batch {index} is a {type(batch).__name__}; each batch must be a "
                        "Tensor or a tuple/list whose first item is the input Tensor (as a DataLoader "
                        "of (x, y) yields)")
    if not x.is_floating_point():
        raise DataError(f"calibration batch {index} has dtype {x.dtype}; give floating-point inputs "
                        "preprocessed exactly as at training time (e.g. x.float() / 255 then "
                        "normalized)")
    if x.dim() < 2:
        raise DataError(f"calibration batch {index} has shape {tuple(x.shape)}; expected a batch "
                        "dimension first, e.g. N x C x H x W")
    if x.shape[0] == 0:
        raise DataError(f"calibration batch {index} is empty (batch size 0)")
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise DataError(f"calibration batch {index} contains {bad} NaN/Inf values; clean the data "
                        "(saliency statistics would be meaningless)")
    if device is not None or dtype is not None:
        x = x.to(device=device, dtype=dtype if dtype is not None else x.dtype)
    return x


def iter_inputs(data: Any, *, device: torch.device | None = None,
                dtype: torch.dtype | None = None) -> Iterator[Tensor]:
    """Checked input tensors from any iterable of batches (a single Tensor is split in batches)."""
    if isinstance(data, Tensor):
        if data.dim() < 2:
            raise DataError(f"calibration tensor has shape {tuple(data.shape)}; expected N x C x H x W")
        data = torch.split(data, DEFAULT_SPLIT)
    if isinstance(data, (str, bytes)) or not isinstance(data, Iterable):
        raise DataError(f"calibration_data must be an iterable of batches (DataLoader, list, "
                        f"generator) or a Tensor, got {type(data).__name__}")
    for i, batch in enumerate(data):
        yield as_input(batch, i, device=device, dtype=dtype)
