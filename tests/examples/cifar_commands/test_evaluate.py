"""examples/cifar_commands/evaluate.py (``examples/cifar.py evaluate``): ispc vs static pruning on a
tiny fake CIFAR folder, and the per-layer checks."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("PIL")
pytest.importorskip("matplotlib")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _cifar_common import load_script, make_fake_cifar  # noqa: E402

from ispc.examples.cifar_commands import evaluate as ev  # noqa: E402

POINT_KEYS = {"method", "mode", "allocation", "keep_ratio", "top1", "mac_reduction", "speedup_b1"}


@pytest.fixture(scope="module")
def cifar():
    yield from load_script("ispc_cifar_script_eval")


@pytest.fixture(scope="module")
def fake(tmp_path_factory) -> Path:
    """8 train and 4 test images per class."""
    return make_fake_cifar(tmp_path_factory.mktemp("ispc_cifar_script_eval"), train=8, test=4,
                           spread=60, step=18)


@pytest.fixture(scope="module")
def checkpoint(cifar, tmp_path_factory) -> Path:
    """A checkpoint in the format the script writes (untrained weights, non-trivial BN)."""
    torch.manual_seed(0)
    model = cifar.build_model("_cifar_tiny_eval:tiny")
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("ckpt") / "final.pt"
    torch.save({"model": model.state_dict(), "model_name": "_cifar_tiny_eval:tiny", "num_classes": 10,
                "top1": 0.1, "epoch": 1}, path)
    return path


def test_evaluate_writes_matched_static_and_ispc_points(cifar, fake: Path, checkpoint: Path,
                                                        tmp_path: Path, capsys) -> None:
    out, png = tmp_path / "eval.json", tmp_path / "eval.png"
    assert cifar.main(["evaluate", "--checkpoint", str(checkpoint), "--data", str(fake),
                       "--cache-dir", str(tmp_path / "cache"), "--json", str(out), "--plot", str(png),
                       "--keep-ratios", "0.5", "0.7", "--speed-rounds", "2", "--cv-images", "16", "--layer-images", "24",
                       "--calibration-size", "48", "--limit", "32", "--batch-size", "16",
                       "--no-progress", "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    assert "dense test top-1" in printed and "static" in printed and "Spearman" in printed

    res = json.loads(out.read_text())
    assert {"model", "checkpoint", "dense_top1", "top1_unit", "points", "cv_check"} <= set(res)
    assert res["model"] == "_cifar_tiny_eval:tiny" and res["checkpoint"] == str(checkpoint)
    assert res["top1_unit"] == "fraction" and 0.0 <= res["dense_top1"] <= 1.0
    assert res["test_images"] == 32 and res["calibration_images"] == 48
    sparse = res["negligible_channels"]
    assert sparse["images"] == 24 and set(sparse["layers"]) == {"3", "6", "9"}
    assert all(0.0 <= v <= 1.0 for v in sparse["layers"].values())
    points = res["points"]
    for p in points:
        assert POINT_KEYS <= set(p)
        assert 0.0 <= p["top1"] <= 1.0 and p["speedup_b1"] > 0 and p["mac_reduction"] < 1.0
    grid = {(p["method"], p["mode"], p["allocation"], p["keep_ratio"]) for p in points}
    allocs = ("layer", "global")
    assert grid == {(m, "threshold", a, r) for m in ("ispc", "static") for a in allocs
                    for r in (0.5, 0.7)} | {("ispc", "topk", a, r) for a in allocs for r in (0.5, 0.7)}
    for a in allocs:
        for r in (0.5, 0.7):
            ours = next(p for p in points if p["method"] == "ispc" and p["mode"] == "threshold"
                        and p["allocation"] == a and p["keep_ratio"] == r)
            static = next(p for p in points if p["method"] == "static" and p["allocation"] == a
                          and p["keep_ratio"] == r)
            assert ours["mac_reduction"] > 0.05
            assert static["mac_reduction"] == pytest.approx(ours["mac_reduction"], abs=0.02)

    check = res["cv_check"]
    assert check["mode"] == "threshold" and check["allocation"] == "layer"
    assert check["keep_ratio"] == 0.5 and check["images"] == 16
    assert [r["layer"] for r in check["layers"]] == ["3", "6", "9"]
    for r in check["layers"]:
        assert r["cv"] > 0 and r["static_error"] >= 0 and r["dynamic_error_dense"] >= 0
    assert check["spearman"] is None or -1.0 <= check["spearman"] <= 1.0
    single = check["single_layer"]
    assert single["images"] == 24 and 0.0 <= single["dense_top1"] <= 1.0
    assert [r["layer"] for r in single["layers"]] == ["3", "6", "9"]
    for r in single["layers"]:
        assert 0.0 < r["kept_fraction"] < 1.0
        assert r["gain"] == pytest.approx(r["dynamic_top1"] - r["static_top1"])
    assert "One layer gated at a time" in printed
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_default_checkpoint_and_spearman(cifar, fake: Path, checkpoint: Path,
                                                  tmp_path: Path, monkeypatch, capsys) -> None:
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "resnet20_dense.pt").write_bytes(checkpoint.read_bytes())
    monkeypatch.chdir(tmp_path)
    assert ev.default_checkpoint().endswith("resnet20_dense.pt")
    (tmp_path / "checkpoints" / "resnet20_fd_ramp.pt").write_bytes(checkpoint.read_bytes())
    assert ev.default_checkpoint().endswith("resnet20_fd_ramp.pt")
    assert cifar.main(["evaluate", "--data", str(fake), "--cache-dir", str(tmp_path / "cache"),
                       "--dense-only", "--no-progress", "--threads", "1"]) == 0
    assert "resnet20_fd_ramp.pt: dense test top-1" in capsys.readouterr().out

    assert ev.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert ev.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert ev.spearman([1, 2, 2, 3], [1, 2, 2, 3]) == pytest.approx(1.0)
    assert ev.spearman([1, 2], [1, 2]) is None and ev.spearman([1, 1, 1], [1, 2, 3]) is None


def test_single_layer_check_restores_gates_and_matches_by_hand() -> None:
    import ispc
    from ispc.examples import models as M

    torch.manual_seed(0)
    model = M.resnet20(num_classes=10).eval()
    data = [torch.randn(16, 3, 32, 32) for _ in range(2)]
    fast = ispc.compile(model, data, config=ispc.GatingConfig(keep_ratio=0.5), progress=False)
    test = [(torch.randn(10, 3, 32, 32), torch.randint(0, 10, (10,))) for _ in range(2)]
    with torch.no_grad():
        before = fast(test[0][0])
    res = ev.single_layer_check(fast, test, images=15, progress=False)
    with torch.no_grad():
        assert torch.equal(fast(test[0][0]), before)  # every gate restored
    assert res["images"] == 15
    assert [r["layer"] for r in res["layers"]] == list(fast.gated_modules())
    x = torch.cat([test[0][0], test[1][0][:5]])
    y = torch.cat([test[0][1], test[1][1][:5]])
    with torch.no_grad():
        assert res["dense_top1"] == pytest.approx(float((model(x).argmax(1) == y).float().mean()))


def test_negligible_channels_counts_dead_channels() -> None:
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 3, padding=1)).eval()
    with torch.no_grad():
        model[0].weight[:4].zero_()  # 4 of 16 channels are zero for every input
        model[0].bias[:4].zero_()
        model[0].bias[4:].fill_(1.0)  # the others are clearly alive
    loader = [(torch.randn(6, 3, 8, 8), torch.zeros(6, dtype=torch.long)) for _ in range(2)]
    res = ev.negligible_channels(model, loader, images=10)
    assert res["images"] == 10 and list(res["layers"]) == ["2"]
    assert res["layers"]["2"] == pytest.approx(4 / 16)
