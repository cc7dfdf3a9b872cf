"""Operators ispc inserts into graphs, with their reference semantics and kernels."""
from .gated_conv import *  # noqa: F401,F403
from .gated_conv import __all__ as _gc_all

__all__ = list(_gc_all)
