"""Turning what users pass as calibration data into a checked stream of input tensors.

A batch is a tensor, a tuple/list whose first item is the input (a ``DataLoader`` of ``(x, y)``),
or a mapping (a dict, a Hugging Face ``BatchFeature``): ``{"pixel_values": x, "labels": y}``. A
mapping names its input: the model is then called with it as that keyword (``model(pixel_values=x)``),
and the stream's :attr:`Inputs.key` says which.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor

from .errors import DataError

__all__ = ["as_input", "iter_inputs", "input_of", "Inputs", "DEFAULT_SPLIT", "LABEL_KEYS"]

#: a single tensor given as calibration data is split into batches of this many inputs
DEFAULT_SPLIT = 64
#: keys of a mapping batch that hold targets, not inputs
LABEL_KEYS = frozenset({"labels", "label", "targets", "target", "y"})
#: the input key Hugging Face vision models take, preferred when a mapping holds several tensors
PREFERRED_KEYS = ("pixel_values", "input", "inputs", "x", "images", "image")


def input_of(batch: Any, index: int, key: str | None = None) -> tuple[Tensor, str | None]:
    """The input tensor of one batch and the keyword it is passed by (None: positionally).

    ``key``: the keyword earlier batches used (a mapping batch must hold it).
    """
    if isinstance(batch, Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        return batch[0], None
    if isinstance(batch, Mapping):
        tensors = {str(k): v for k, v in batch.items() if isinstance(v, Tensor)}
        if key is None:
            inputs = [k for k in tensors if k not in LABEL_KEYS]
            key = next((k for k in PREFERRED_KEYS if k in inputs), None)
            if key is None and len(inputs) == 1:
                key = inputs[0]
            if key is None:
                raise DataError(
                    f"calibration batch {index} is a mapping with input tensors {sorted(inputs)} "
                    f"(keys {sorted(map(str, batch))}); ispc feeds the model one input: pass "
                    "batches holding one input tensor (and labels), or a generator yielding it, "
                    f"e.g. ({{'pixel_values': b[...]}} for b in loader)")
        if key not in tensors:
            raise DataError(f"calibration batch {index} has no tensor {key!r} (keys "
                            f"{sorted(map(str, batch))}); every batch must hold the input the first "
                            "one did")
        return tensors[key], key
    raise DataError(f"calibration batch {index} is a {type(batch).__name__}; each batch must be a "
                    "Tensor, a tuple/list whose first item is the input Tensor (as a DataLoader "
                    "of (x, y) yields), or a mapping such as {'pixel_values': x, 'labels': y}")


def as_input(batch: Any, index: int, *, device: torch.device | None = None,
             dtype: torch.dtype | None = None, key: str | None = None) -> Tensor:
    """The checked input tensor of one batch (see :func:`input_of`).

    Floating batches are moved to the model's device and floating dtype. Integer tensors (e.g.
    uint8 images) are refused: their scaling and normalization must match training, which ispc
    cannot know.
    """
    x, _ = input_of(batch, index, key)
    return _checked(x, index, device, dtype)


def _checked(x: Tensor, index: int, device: torch.device | None, dtype: torch.dtype | None) -> Tensor:
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


class Inputs(Iterator[Tensor]):
    """Checked input tensors from any iterable of batches. ``key``: the keyword the batches name
    their input by (known once the first batch was read; None: positional)."""

    def __init__(self, data: Iterable, device: torch.device | None, dtype: torch.dtype | None) -> None:
        self._batches = enumerate(data)
        self._device, self._dtype = device, dtype
        self.key: str | None = None
        self._started = False

    def __next__(self) -> Tensor:
        i, batch = next(self._batches)
        x, key = input_of(batch, i, self.key)
        if self._started and key != self.key:
            raise DataError(f"calibration batch {i} passes its input "
                            f"{'as ' + repr(key) if key else 'positionally'}, batch 0 "
                            f"{'as ' + repr(self.key) if self.key else 'positionally'}; give "
                            "batches of one kind")
        self.key, self._started = key, True
        return _checked(x, i, self._device, self._dtype)


def iter_inputs(data: Any, *, device: torch.device | None = None,
                dtype: torch.dtype | None = None) -> Inputs:
    """Checked input tensors from any iterable of batches (a single Tensor is split in batches)."""
    if isinstance(data, Tensor):
        if data.dim() < 2:
            raise DataError(f"calibration tensor has shape {tuple(data.shape)}; expected N x C x H x W")
        data = torch.split(data, DEFAULT_SPLIT)
    if isinstance(data, (str, bytes, Mapping)) or not isinstance(data, Iterable):
        hint = (" (a single mapping batch: wrap it in a list, [batch])" if isinstance(data, Mapping)
                else "")
        raise DataError(f"calibration_data must be an iterable of batches (DataLoader, list, "
                        f"generator) or a Tensor, got {type(data).__name__}{hint}")
    return Inputs(data, device, dtype)
