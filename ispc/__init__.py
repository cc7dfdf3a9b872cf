"""ispc: the Instance-wise Sparsity Compiler.

Trace a CNN, calibrate on sample data, rank layers by how much their channel usage varies between
inputs, and rewrite the graph so that each input's negligible channels are skipped in the next
convolution (Liu et al., IJCAI 2019).

    >>> import ispc
    >>> fast = ispc.compile(model, calibration_loader, config=ispc.GatingConfig(keep_ratio=0.5))
    >>> print(fast.report)
"""
from . import ops  # registers torch.ops.ispc.*
from . import backends, export, serialization
from .api import BACKENDS, compile, inspect
from .compiled import CompiledModel
from .config import GatingConfig
from .errors import (BackendUnavailableError, ConfigError, DataError, IspcError, OptionError,
                     PassError, TraceError, UnsupportedModelError)
from .baselines import static_prune
from .export import export_program
from .feature_decay import FeatureDecay
from .gate_masks import GateMasks
from .serialization import ArchiveError, load, save
from .tune import TuneReport, tune
from .modules import GatedConv2d, LinearConv2d
from .report import LayerReport, Report

__version__ = "0.17.0"

__all__ = [
    "compile", "inspect", "static_prune", "FeatureDecay", "GateMasks", "GatingConfig", "Report",
    "LayerReport", "CompiledModel", "GatedConv2d", "LinearConv2d",
    "IspcError", "ConfigError", "OptionError", "DataError", "TraceError", "UnsupportedModelError", "PassError",
    "BackendUnavailableError", "ArchiveError", "BACKENDS", "ops", "backends", "export",
    "serialization", "export_program", "save", "load", "tune", "TuneReport", "__version__",
]
