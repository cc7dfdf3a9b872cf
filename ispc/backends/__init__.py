"""Lowerings of compiled models to deployment runtimes.

Each backend lives in its own module and imports its optional dependency lazily (inside the
functions that need it), so ``import ispc.backends.onnx`` and ``import ispc.backends.tensorrt``
work without onnx / torch_tensorrt installed; calling them raises
:class:`ispc.errors.BackendUnavailableError` with an install hint instead.

- :mod:`ispc.backends.onnx`: :func:`~ispc.backends.onnx.export_onnx` (``pip install ispc[onnx]``).
- :mod:`ispc.backends.tensorrt`: :func:`~ispc.backends.tensorrt.compile_tensorrt`,
  :func:`~ispc.backends.tensorrt.save_engine`, :func:`~ispc.backends.tensorrt.load_engine`
  (torch-tensorrt, an NVIDIA GPU).
"""

__all__ = ["onnx", "tensorrt"]
