"""Errors raised for a user's mistake or an unsupported model.

Every error ispc raises on purpose derives from :class:`IspcError`, so callers can catch one type.
The subclasses also derive from the builtin a Python user would expect (``ValueError`` for a bad
value, ``TypeError`` for a wrong type) so ``except ValueError`` keeps working.
"""
from __future__ import annotations

__all__ = [
    "IspcError",
    "ConfigError",
    "OptionError",
    "DataError",
    "TraceError",
    "UnsupportedModelError",
    "BackendUnavailableError",
    "PassError",
    "ArchiveError",
]


class IspcError(Exception):
    """Base class of every error raised for a user's mistake or an unsupported model."""


class ConfigError(IspcError, ValueError):
    """An invalid configuration value (wrong range, NaN, unknown option)."""


class OptionError(ConfigError, TypeError):
    """An option a config or an entry point does not have (a misspelt keyword, a config option
    passed to ``compile`` itself), or options given by position where only keywords are taken.
    A ``TypeError`` too, as Python raises for an unexpected keyword."""


class DataError(IspcError, ValueError):
    """Calibration or input data that ispc cannot use (empty, NaN/Inf, wrong shape or dtype)."""


class TraceError(IspcError, TypeError):
    """The model could not be captured as a torch.fx graph."""


class UnsupportedModelError(IspcError, TypeError):
    """The object given is not a model ispc can compile."""


class BackendUnavailableError(IspcError, RuntimeError):
    """A requested backend (or its optional dependency / hardware) is not available here."""


class PassError(IspcError, RuntimeError):
    """A compiler pass failed on something it did not expect (a bug, or a model construct no pass
    handles). The message names the pass and the passes that ran before it; the original exception
    is chained (``__cause__``). An :class:`IspcError` a pass raises on purpose is not wrapped: it
    keeps its type and message, and carries the same two facts as ``pass_name`` and
    ``passes_before``."""

    def __init__(self, message: str, *, pass_name: str, passes_before: tuple[str, ...]) -> None:
        super().__init__(message)
        self.pass_name = pass_name
        self.passes_before = passes_before


class ArchiveError(IspcError, ValueError):
    """A file that is not an ispc archive, is damaged, or names something ispc will not load."""
