"""examples/cifar_sweep.py: the epoch budget arithmetic, argument checks, and two tiny runs end to end."""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("PIL")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _cifar_common import HERE, REPO, make_fake_cifar  # noqa: E402

spec = importlib.util.spec_from_file_location("cifar_sweep", REPO / "examples" / "cifar_sweep.py")
sweep = importlib.util.module_from_spec(spec)
sys.modules["cifar_sweep"] = sweep  # dataclasses look their module up while the class is built
spec.loader.exec_module(sweep)


def test_epochs_within_fits_the_slowest_run_with_a_margin() -> None:
    fast = sweep.Probe(seconds_per_step=0.01, eval_seconds=1.0, startup_seconds=10.0)
    slow = sweep.Probe(seconds_per_step=0.02, eval_seconds=1.0, startup_seconds=10.0)
    # slow: (0.02 * 390 + 1) * 1.1 = 9.68 s per epoch; (400 - 10) / 9.68 = 40.3
    assert sweep.epochs_within(400, [fast, slow], 390) == 40
    assert sweep.epochs_within(400, [fast], 390) == 72  # (0.01 * 390 + 1) * 1.1 = 5.39 s; 390 / 5.39
    assert sweep.epochs_within(400, [fast, slow], 390, max_epochs=30) == 30
    assert sweep.epochs_within(5, [slow], 390) == 0  # start-up alone is over the budget
    with pytest.raises(ValueError):
        sweep.epochs_within(0, [fast], 390)


def test_parse_run_rejects_what_the_sweep_sets_itself() -> None:
    assert sweep.parse_run("fd6=train --model resnet20 --feature-decay 6e-4") == (
        "fd6", ["train", "--model", "resnet20", "--feature-decay", "6e-4"])
    for bad in ("no_equals", "a b=train", "x=evaluate", "x=train --epochs 3", "x=train --out y"):
        with pytest.raises(argparse.ArgumentTypeError):
            sweep.parse_run(bad)


def test_two_runs_share_the_budget_and_are_summarized(tmp_path: Path, monkeypatch, capsys) -> None:
    fake = make_fake_cifar(tmp_path / "data", train=16, test=4, spread=40, step=20)
    monkeypatch.setenv("PYTHONPATH", str(HERE))
    common = f"--data {fake} --cache-dir {tmp_path / 'cache'} --batch-size 32 --threads 1 --no-progress"
    out = tmp_path / "sweep"
    assert sweep.main(["--budget", "60", "--max-epochs", "2", "--out", str(out), "--common", common,
                       "--run", "plain=train --model _cifar_tiny:tiny",
                       "--run", "fd=train --model _cifar_tiny:tiny --feature-decay 1e-3"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs"] == 2
    assert [r["name"] for r in summary["runs"]] == ["plain", "fd"]
    assert all(r["exit"] == 0 and r["finished_epochs"] == 2 for r in summary["runs"])
    logs = {n: [json.loads(x) for x in (out / n / "log.jsonl").read_text().splitlines()]
            for n in ("plain", "fd")}
    assert "feature_decay" in logs["fd"][0] and "feature_decay" not in logs["plain"][0]
    assert (out / "fd" / "final.pt").exists() and (out / "probe" / "fd" / "log.jsonl").exists()
    assert "2 runs at once: 2 epochs each" in capsys.readouterr().out
