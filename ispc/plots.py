"""Plots of a report (matplotlib, the optional ``[plot]`` extra): where people would rather look."""
from __future__ import annotations

from pathlib import Path

from .errors import BackendUnavailableError
from .report import Report

__all__ = ["plot_cv", "plot_kept", "save_plots"]


def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise BackendUnavailableError("plots need matplotlib: pip install 'ispc[plot]'") from None
    return plt


def plot_cv(report: Report, path: str | Path) -> Path:
    """Bar chart of the CV per candidate layer in graph order; gated layers highlighted."""
    plt = _plt()
    rows = [r for r in report.layers if r.cv is not None]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.28 * len(rows)), 4))
    colors = ["#3a923a" if r.gated else "#9e9e9e" for r in rows]
    ax.bar(range(len(rows)), [r.cv for r in rows], color=colors)
    ax.set_xticks(range(len(rows)), [r.name for r in rows], rotation=90, fontsize=7)
    ax.set_ylabel("CV of channel saliency across inputs")
    ax.set_title("ispc: layer ranking (green = gated)")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_kept(report: Report, path: str | Path) -> Path:
    """Kept input channels per gated layer across inputs: mean with the p10-p90 range."""
    plt = _plt()
    rows = [r for r in report.gated_layers if r.kept_mean is not None]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.28 * len(rows)), 4))
    xs = range(len(rows))
    frac = [r.kept_mean / r.in_channels for r in rows]
    lo = [(r.kept_mean - r.kept_p10) / r.in_channels for r in rows]
    hi = [(r.kept_p90 - r.kept_mean) / r.in_channels for r in rows]
    ax.errorbar(xs, frac, yerr=[lo, hi], fmt="o", color="#2b6cb0", ecolor="#90cdf4", capsize=3)
    ax.set_xticks(list(xs), [r.name for r in rows], rotation=90, fontsize=7)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("fraction of input channels kept")
    ax.set_title("ispc: kept channels per input (mean, p10-p90)")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def save_plots(report: Report, folder: str | Path) -> list[Path]:
    """Both plots into ``folder`` (created if needed)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return [plot_cv(report, folder / "cv.png"), plot_kept(report, folder / "kept.png")]
