"""``ispc tune``: labelled validation data from class folders or a .pt of (x, y), the tuned model
saved and loadable, and one-line errors."""
from __future__ import annotations

import json
import re

import pytest
import torch
import ispc
from ispc.cli import main

MODEL_FILE = '''
import torch, torch.nn as nn
def make():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1),
                         nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 4, bias=False))
'''


@pytest.fixture()
def files(tmp_path):
    (tmp_path / "net.py").write_text(MODEL_FILE)
    g = torch.Generator().manual_seed(0)
    torch.save(torch.randn(128, 3, 8, 8, generator=g), tmp_path / "calib.pt")
    x = torch.randn(64, 3, 8, 8, generator=g)
    namespace: dict = {}
    exec(MODEL_FILE, namespace)
    with torch.no_grad():
        y = namespace["make"]()(x).argmax(1)
    torch.save((x, y), tmp_path / "val.pt")
    return tmp_path


def test_tune_saves_a_model_that_loads(files, capsys):
    out, rep = files / "tuned.ispc", files / "tune.json"
    argv = ["tune", f"{files}/net.py:make", "--data", str(files / "calib.pt"), "--val-data",
            str(files / "val.pt"), "--max-drop", "5", "--target", "macs", "--out", str(out),
            "--report-json", str(rep), "--normalize", "none", "--mode", "topk"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "ispc.tune (topk, target macs)" in printed and "chosen: #" in printed
    report = json.loads(rep.read_text())
    assert report["best"]["metric"] >= report["floor"] and report["dense_metric"] == 100.0
    loaded = ispc.load(out)
    assert loaded.config.mode == "topk" and loaded.config.layer_keep_ratios
    assert dict(loaded.config.layer_keep_ratios) == report["config"]["layer_keep_ratios"]


def test_tune_reads_class_folders(files, capsys):
    pytest.importorskip("PIL")
    from PIL import Image
    val = files / "val"
    g = torch.Generator().manual_seed(1)
    for c in ("cat", "dog"):
        (val / c).mkdir(parents=True)
        for i in range(3):
            px = (torch.rand(8, 8, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(px).save(val / c / f"{i}.png")
    x, y, classes = ispc.datasets.load_labeled_images(val)
    assert classes == ["cat", "dog"] and y.tolist() == [0, 0, 0, 1, 1, 1] and x.shape == (6, 3, 8, 8)
    assert main(["tune", f"{files}/net.py:make", "--data", str(files / "calib.pt"), "--val-data",
                 str(val), "--max-drop", "100", "--target", "macs", "--time-budget", "1e-9",
                 "--out", str(files / "t.ispc")]) == 0
    assert "stopped early" in capsys.readouterr().out


@pytest.mark.parametrize("extra,msg", [
    (["--val-data", "{files}/missing"], "does not exist"),
    (["--val-data", "{files}/calib.pt"], "expected \\(x, y\\)"),
    (["--val-data", "{files}/val.pt", "--max-drop", "-1"], "max_drop must be a number >= 0"),
    (["--val-data", "{files}/val.pt", "--mode", "topk", "--relative", "--max-drop", "3"],
     "relative=True"),
])
def test_tune_mistakes_are_one_line_errors(files, capsys, extra, msg):
    argv = ["tune", f"{files}/net.py:make", "--data", str(files / "calib.pt"), "--max-drop", "1",
            "--out", str(files / "o.ispc"), *[a.format(files=files) for a in extra]]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ispc tune: error:") and "\n" not in err
    assert re.search(msg, err), err
