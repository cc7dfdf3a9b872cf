"""examples/cifar_commands/tune.py (``examples/cifar.py tune``): calibration and validation split
off the training images, the search, test figures, the results file, resuming from the cache."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("PIL")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _cifar_common import load_script, make_fake_cifar  # noqa: E402

from ispc.datasets import CIFAR10  # noqa: E402
from ispc.examples.cifar_commands import tune as tc  # noqa: E402


@pytest.fixture(scope="module")
def cifar():
    yield from load_script("ispc_cifar_script_tune")


@pytest.fixture(scope="module")
def fake(tmp_path_factory) -> Path:
    """14 train and 3 test images per class."""
    return make_fake_cifar(tmp_path_factory.mktemp("ispc_cifar_script_tune"), train=14, test=3,
                           spread=60, step=18)


@pytest.fixture(scope="module")
def checkpoint(cifar, tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = cifar.build_model("_cifar_tiny_eval:tiny")
    path = tmp_path_factory.mktemp("ckpt") / "final.pt"
    torch.save({"model": model.state_dict(), "model_name": "_cifar_tiny_eval:tiny", "num_classes": 10},
               path)
    return path


def test_split_is_disjoint_and_matches_evaluate(fake: Path, tmp_path: Path) -> None:
    data = CIFAR10(fake, cache_dir=tmp_path / "cache", progress=False)
    calib, val = tc.split_train(data, 100, 30, batch_size=16, device=torch.device("cpu"))
    assert calib.images.shape[0] == 100 and val.images.shape[0] == 30
    flat = lambda t: {bytes(r.numpy().tobytes()) for r in t}  # noqa: E731
    assert not flat(calib.images) & flat(val.images)
    same = tc.subset_loader(data, "train", 100, batch_size=16, device=torch.device("cpu"))
    assert torch.equal(same.images, calib.images)
    with pytest.raises(Exception, match="more than"):
        tc.split_train(data, 100, 100, batch_size=16, device=torch.device("cpu"))


def test_tune_command_writes_results_and_resumes(cifar, fake: Path, checkpoint: Path,
                                                 tmp_path: Path, capsys) -> None:
    out, cache = tmp_path / "tune.json", tmp_path / "search.json"
    argv = ["tune", "--checkpoint", str(checkpoint), "--data", str(fake), "--cache-dir",
            str(tmp_path / "cache"), "--calibration-size", "104", "--val-size", "30",
            "--batch-size", "32", "--max-drop", "20", "--cache", str(cache), "--json", str(out),
            "--no-progress", "--threads", "1"]
    assert cifar.main(argv + ["--time-budget", "1e-9"]) == 3  # stopped: nothing written but the cache
    assert "run the same command again" in capsys.readouterr().out and not out.exists()
    assert json.loads(cache.read_text())["metrics"]["dense"] > 0
    assert cifar.main(argv) == 0
    printed = capsys.readouterr().out
    assert "test top-1" in printed and "fewer MACs on the test images" in printed
    res = json.loads(out.read_text())["runs"]["final/threshold/macs/20"]
    assert res["complete"] and res["val_images"] == 30 and res["calibration_images"] == 104
    assert res["test_images"] == 30 and 0.0 <= res["test_top1"] <= 1.0
    assert res["val_top1"] >= res["val_top1_dense"] - 0.20 - 1e-9
    assert res["layer_keep_ratios"] and res["search_report"]["best"]["feasible"]
    assert res["command"].startswith("python examples/cifar.py tune")
    assert cifar.main(argv + ["--static"]) == 0
    runs = json.loads(out.read_text())["runs"]
    assert set(runs) == {"final/threshold/macs/20", "final/static/macs/20"}
    assert runs["final/static/macs/20"]["keep_fractions"] is not None
