"""Operators ispc inserts into graphs, with their reference semantics and kernels."""
from .gated_conv import *  # noqa: F401,F403
from .gated_conv import __all__ as _gc_all
from .triton_gated_conv import register_cuda_kernel as _register_cuda_kernel

# the Triton kernel for CUDA tensors, if triton is installed (triton itself is imported lazily)
_register_cuda_kernel()

__all__ = list(_gc_all)
