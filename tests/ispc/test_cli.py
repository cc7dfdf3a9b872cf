"""The command line: happy paths, formats, and one-line errors with exit status 2."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from ispc.cli import load_model, main

MODEL_FILE = '''
import torch.nn as nn
def make():
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1),
                         nn.ReLU(), nn.Conv2d(32, 8, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
'''


@pytest.fixture()
def files(tmp_path):
    (tmp_path / "net.py").write_text(MODEL_FILE)
    torch.save(torch.randn(24, 3, 16, 16), tmp_path / "data.pt")
    return tmp_path


def test_inspect_formats(files, capsys):
    model, data = f"{files}/net.py:make", str(files / "data.pt")
    assert main(["inspect", model, "--data", data, "--format", "json", "--batch-size", "8"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["summary"]["calibration_samples"] == 24
    assert {r["name"] for r in d["layers"]} == {"0", "2", "4"}
    assert main(["inspect", model, "--data", data, "--format", "markdown"]) == 0
    assert capsys.readouterr().out.startswith("# ispc report")
    dot = files / "g.dot"
    assert main(["inspect", model, "--data", data, "--dot", str(dot), "--keep-ratio", "0.25",
                 "--mode", "topk"]) == 0
    out = capsys.readouterr().out
    assert "k=4" in out and dot.read_text().startswith("digraph ispc")


def test_inspect_plots(files, capsys):
    pytest.importorskip("matplotlib")
    assert main(["inspect", f"{files}/net.py:make", "--data", str(files / "data.pt"),
                 "--plots", str(files / "plots")]) == 0
    assert (files / "plots" / "cv.png").stat().st_size > 1000
    assert (files / "plots" / "kept.png").stat().st_size > 1000


@pytest.mark.parametrize("argv,msg", [
    (["inspect", "nosuchmodel", "--data", "x.pt"], "unknown model"),
    (["inspect", "{files}/net.py:nothere", "--data", "{files}/data.pt"], "has no 'nothere'"),
    (["inspect", "{files}/net.py:make", "--data", "{files}/missing"], "does not exist"),
    (["inspect", "{files}/net.py:make", "--data", "{files}/data.pt", "--keep-ratio", "1.5"],
     "keep_ratio"),
])
def test_user_mistakes_are_one_line_errors(files, capsys, argv, msg):
    argv = [a.format(files=files) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert msg in err and "Traceback" not in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("content,msg", [
    (None, "does not exist"),
    ("text", "is not a file torch.load reads"),
    ("model", "holds pickled Python objects"),
    ("tensor", "holds a Tensor, not a state dict"),
    ("wrong", "Missing key(s) in state_dict"),
])
def test_checkpoint_mistakes_are_one_line_errors(files, capsys, content, msg):
    """A checkpoint that is not a state dict of the model (a pickled whole model, another file, a
    tensor) ended in a traceback; a mismatched one named no key."""
    ckpt = files / "ckpt.pt"
    if content == "text":
        ckpt.write_text("not a checkpoint")
    elif content == "model":  # torch.save(model): a class a weights-only load refuses
        torch.save(torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3)), ckpt)
    elif content == "tensor":
        torch.save(torch.zeros(3), ckpt)
    elif content == "wrong":
        torch.save({"0.weight": torch.zeros(1)}, ckpt)
    assert main(["inspect", f"{files}/net.py:make", "--data", str(files / "data.pt"),
                 "--checkpoint", str(ckpt)]) == 2
    err = capsys.readouterr().err.strip()
    assert msg in err and "Traceback" not in err and len(err.splitlines()) == 1, err


def test_data_with_other_channels_than_the_normalization_says_how_to_fix(files, capsys):
    torch.save(torch.randn(8, 1, 16, 16), files / "gray.pt")
    assert main(["inspect", f"{files}/net.py:make", "--data", str(files / "gray.pt")]) == 2
    err = capsys.readouterr().err.strip()
    assert "1 channels" in err and "--normalize none" in err and len(err.splitlines()) == 1


def test_debug_shows_traceback(files, capsys):
    assert main(["--debug", "inspect", "nosuchmodel", "--data", "x.pt"]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_help_on_every_command():
    for cmd in ([], ["demo"], ["inspect"], ["compile"], ["bench"]):
        r = subprocess.run([sys.executable, "-m", "ispc.cli", *cmd, "--help"], capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 0 and "usage: ispc" in r.stdout


def test_bundled_model_names():
    assert type(load_model("resnet20")).__name__ == "CifarResNet"


def test_bench_small(files, capsys):
    out_json = files / "bench.json"
    assert main(["bench", f"{files}/net.py:make", "--input-size", "16", "--batch-sizes", "1", "2",
                 "--rounds", "3", "--warmup", "1", "--json", str(out_json)]) == 0
    doc = json.loads(out_json.read_text())
    rows = doc["results"]
    assert doc["machine"]["cpu"] and "avx2" in doc["machine"]["isa"]
    assert "runtimes" not in doc  # without --runtimes: the dense self only
    assert [r["batch_size"] for r in rows] == [1, 2]
    assert all(r["dense_ms"] > 0 and r["theoretical_speedup"] >= 1 for r in rows)
    assert all(r["allocator"] for r in rows)  # recorded: the benchmark tunes malloc by default
    assert "realized" in capsys.readouterr().out


def test_bench_runtimes_times_the_dense_model_in_each_and_compares(files, capsys, monkeypatch):
    """--runtimes: each named dense runtime in its own process, ispc's speed-up over each and over
    the fastest, realized/theoretical; a runtime that is not installed is skipped with a note."""
    from ispc import runtimes as rt
    monkeypatch.setitem(rt.RUNTIMES, "openvino",
                        rt.Runtime("openvino", "OpenVINO f32", "no-such-openvino-dist", "onnx"))
    out_json = files / "bench.json"
    assert main(["bench", f"{files}/net.py:make", "--input-size", "16", "--batch-sizes", "2",
                 "--rounds", "2", "--warmup", "1", "--no-latency-aware", "--runtime-rounds", "1",
                 "--runtimes", "eager", "onnxruntime", "openvino", "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    doc = json.loads(out_json.read_text())
    assert doc["baseline"] == "best" and doc["machine"]["threads"] >= 1
    timings = [rt.RuntimeTiming.from_dict(t) for t in doc["runtimes"]]
    assert [t.runtime for t in timings] == ["eager", "onnxruntime", "openvino", "ispc"]
    eager, ort, ov, ispc_t = timings
    assert eager.available and ort.available and eager.max_rel_err < 1e-4
    assert not ov.available and "not installed" in ov.note
    (c,) = doc["comparisons"]
    best = min((eager, ort), key=lambda t: t.median_ms)
    assert c["baseline"] == best.runtime
    assert c["speedup"] == pytest.approx(best.median_ms / ispc_t.median_ms)
    assert c["efficiency"] == pytest.approx(c["speedup"] / c["theoretical_speedup"])
    assert set(c["over"]) == {"eager", "onnxruntime"}
    assert "over the fastest float32 dense runtime" in out and "realized/theoretical" in out
    assert "OpenVINO f32: skipped (no-such-openvino-dist is not installed" in out


def test_demo_prints_the_speed_up_over_the_fastest_dense_runtime_installed(capsys):
    assert main(["demo", "--model", "resnet20", "--image-size", "32", "--calibration-size", "16",
                 "--rounds", "2", "--no-latency-aware", "--runtimes", "eager"]) == 0
    out = capsys.readouterr().out
    assert "dense runtimes, each in fresh processes" in out
    line = next(x for x in out.splitlines() if x.startswith("ispc, resnet20 batch 1:"))
    assert "over the fastest float32 dense runtime (eager" in line and "over each: eager " in line


def test_bench_baseline_names_a_runtime_and_times_it(files, capsys, tmp_path):
    assert main(["bench", f"{files}/net.py:make", "--input-size", "16", "--batch-sizes", "1",
                 "--rounds", "2", "--warmup", "1", "--no-latency-aware", "--runtime-rounds", "1",
                 "--baseline", "eager", "--json", str(tmp_path / "b.json")]) == 0
    doc = json.loads((tmp_path / "b.json").read_text())
    assert [t["runtime"] for t in doc["runtimes"]] == ["eager", "ispc"]
    assert doc["baseline"] == "eager" and doc["comparisons"][0]["baseline"] == "eager"
    assert "over the dense runtime (eager" in capsys.readouterr().out


def test_bench_with_data_times_the_given_images(files, capsys):
    out_json = files / "bench.json"
    assert main(["bench", f"{files}/net.py:make", "--data", str(files / "data.pt"), "--batch-sizes",
                 "1", "8", "--rounds", "3", "--warmup", "1", "--json", str(out_json)]) == 0
    rows = json.loads(out_json.read_text())["results"]
    # all 24 images, not random inputs: one batch each at batch 1 (24), three at batch 8
    assert [r["inputs"] for r in rows] == ["24 distinct batches, cycled: 24 given examples",
                                           "3 distinct batches, cycled: 24 given examples"]
    assert main(["bench", f"{files}/net.py:make", "--input-size", "16", "--batch-sizes", "2",
                 "--input-pool", "5", "--rounds", "2", "--warmup", "1", "--json", str(out_json)]) == 0
    assert json.loads(out_json.read_text())["results"][0]["inputs"].startswith("5 distinct batches, cycled: random")


def test_compile_writes_a_loadable_file(files, capsys):
    import ispc

    out = files / "net.ispc"
    assert main(["compile", f"{files}/net.py:make", "--data", str(files / "data.pt"),
                 "--keep-ratio", "0.5", "--allocation", "global", "--out", str(out)]) == 0
    loaded = ispc.load(out)
    assert loaded.config.allocation == "global"
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert loaded(x).shape == (2, 8)
    assert loaded.report.summary["keep_ratio"] == 0.5


def test_bench_saved_times_the_archive_without_compiling(files, capsys, monkeypatch):
    """--saved: the compiled model as saved (its own gates and kernels), against MODEL dense."""
    import ispc.cli as cli

    out = files / "net.ispc"
    assert main(["compile", f"{files}/net.py:make", "--data", str(files / "data.pt"),
                 "--keep-ratio", "0.5", "--mode", "topk", "--out", str(out)]) == 0
    capsys.readouterr()

    def no_compile(*a, **k):
        raise AssertionError("bench --saved compiled the model")

    monkeypatch.setattr(cli, "ispc_compile", no_compile)
    out_json = files / "bench.json"
    assert main(["bench", f"{files}/net.py:make", "--saved", str(out), "--input-size", "16",
                 "--batch-sizes", "1", "--rounds", "3", "--warmup", "1", "--json",
                 str(out_json)]) == 0
    (row,) = json.loads(out_json.read_text())["results"]
    assert row["gated_ms"] > 0 and row["theoretical_speedup"] > 1.2  # half the channels kept


@pytest.mark.parametrize("extra,msg", [
    (["--keep-ratio", "0.3"], "--keep-ratio: gating options do not apply to a saved model"),
    (["--saved", "{files}/missing.ispc"], "does not exist; write one with ispc compile"),
    (["--saved", "{files}/data.pt"], "is not an ispc archive"),
])
def test_bench_saved_mistakes_are_one_line_errors(files, capsys, extra, msg):
    out = files / "net.ispc"
    assert main(["compile", f"{files}/net.py:make", "--data", str(files / "data.pt"),
                 "--out", str(out)]) == 0
    capsys.readouterr()
    argv = ["bench", f"{files}/net.py:make", "--input-size", "16", *[a.format(files=files) for a in extra]]
    if "--saved" not in argv:
        argv += ["--saved", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert msg in err and "Traceback" not in err and len(err.splitlines()) == 1


def test_bench_saved_of_another_model_and_an_archive_as_model_are_refused(files, capsys):
    (files / "net.py").write_text(MODEL_FILE + "\ndef other():\n    return nn.Sequential("
                                  "nn.Conv2d(3, 4, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())\n")
    out = files / "net.ispc"
    assert main(["compile", f"{files}/net.py:make", "--data", str(files / "data.pt"),
                 "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["bench", f"{files}/net.py:other", "--saved", str(out), "--input-size", "16"]) == 2
    assert "returns (1, 8) where" in capsys.readouterr().err
    assert main(["bench", str(out)]) == 2
    err = capsys.readouterr().err
    assert "is a file, not a model" in err and f"--saved {out}" in err


def test_channels_last_flag_sets_the_layout(files):
    import ispc
    from ispc.passes.channels_last import runs_channels_last

    for flag, want in (("on", True), ("off", False)):
        out = files / f"net_{flag}.ispc"
        assert main(["compile", f"{files}/net.py:make", "--data", str(files / "data.pt"),
                     "--channels-last", flag, "--out", str(out)]) == 0
        loaded = ispc.load(out)
        assert loaded.config.channels_last is want
        assert runs_channels_last(loaded.graph_module) is want
        with torch.no_grad():
            assert loaded(torch.randn(2, 3, 16, 16)).shape == (2, 8)


def test_bench_per_layer_at_each_batch_size(files, capsys, tmp_path):
    assert main(["bench", f"{files}/net.py:make", "--input-size", "16", "--batch-sizes", "1", "3",
                 "--rounds", "3", "--warmup", "1", "--per-layer", "--no-latency-aware",
                 "--json", str(tmp_path / "bench.json")]) == 0
    out = capsys.readouterr().out
    results = json.loads((tmp_path / "bench.json").read_text())["results"]
    assert [r["batch_size"] for r in results] == [r["per_layer"]["batch_size"] for r in results] == [1, 3]
    for r in results:
        p = r["per_layer"]
        assert p["conv_dense_ms"] == pytest.approx(sum(e["dense_ms"] for e in p["layers"]))
        assert p["whole_gated_ms"] > 0 and p["conv_gated_ms"] > 0  # timings: no order asserted
        assert {e["kernel"] for e in p["layers"]} - {"dense"}, "some layer is gated"
    assert "per layer, batch 1:" in out and "per layer, batch 3:" in out
    assert out.count("total (conv layers)") == 2 and "kernel" in out
    for table in out.split("per layer, batch ")[1:]:
        rows = {line.split("  ")[0].strip(): line.split() for line in table.splitlines()}
        whole, convs, rest = (rows["whole model (hooked)"], rows["total (conv layers)"],
                              rows["outside conv layers"])
        # dense and gated columns: whole = convs + the rest, each timed in the same runs
        for col in (-3, -2):
            assert float(whole[col]) == pytest.approx(float(convs[col]) + float(rest[col]), abs=2e-3)


def test_gate_linear_flag_gates_the_classifier(tmp_path, capsys):
    (tmp_path / "clf.py").write_text(
        "import torch.nn as nn\n"
        "def make():\n"
        "    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),\n"
        "                         nn.Flatten(), nn.Linear(16 * 8 * 8, 10))\n")
    torch.save(torch.randn(24, 3, 16, 16), tmp_path / "data.pt")
    args = ["inspect", f"{tmp_path}/clf.py:make", "--data", str(tmp_path / "data.pt"),
            "--format", "json", "--mode", "topk"]
    rows = []
    for extra in ([], ["--gate-linear"]):
        assert main(args + extra) == 0
        rows.append({r["name"]: r for r in json.loads(capsys.readouterr().out)["layers"]})
    assert not rows[0]["4"]["gated"] and "gate_linear" in rows[0]["4"]["reason"]
    assert rows[1]["4"]["gated"] and rows[1]["4"]["op"] == "linear" and rows[1]["4"]["k"] == 8


def test_gating_options_are_read_from_the_config():
    """Every GatingConfig field (but those marked cli=False: leaf_modules, layer_keep_ratios) is
    an option, with the config's default; demo
    and bench compile latency-aware by default and set the batch size they time themselves."""
    import dataclasses

    from ispc.cli import build_parser, config_from_args
    from ispc.config import GatingConfig

    parser = build_parser()
    fields = [f.name for f in dataclasses.fields(GatingConfig) if f.metadata.get("cli", True)]
    assert "keep_ratio" in fields and "leaf_modules" not in fields
    args = parser.parse_args(["inspect", "m", "--data", "d"])
    assert all(hasattr(args, name) for name in fields)
    assert config_from_args(args) == GatingConfig()
    demo = parser.parse_args(["demo", "--batch-sizes", "4", "8"])
    assert not hasattr(demo, "latency_batch_size")
    cfg = config_from_args(demo, latency_batch_size=min(demo.batch_sizes))
    assert cfg == GatingConfig(latency_aware=True, latency_batch_size=4)
    args = parser.parse_args(["compile", "m", "--data", "d", "--out", "o", "--mode", "topk",
                              "--channels-last", "off", "--exclude", "fc", "layer4.*",
                              "--no-prune-dead", "--latency-aware", "--min-gain", "0.1"])
    assert config_from_args(args) == GatingConfig(mode="topk", channels_last=False,
                                                  exclude=("fc", "layer4.*"), prune_dead=False,
                                                  latency_aware=True, min_gain=0.1)


FACTORY_FILE = '''
import torch.nn as nn

class Opaque(nn.Module):
    def forward(self, x):
        return x * 2 if x.shape[-1] > 1 else x  # torch.fx cannot trace this; it holds no layer


class Net(nn.Module):
    def __init__(self, width=16, act="relu"):
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.act = nn.ReLU() if act == "relu" else nn.GELU()
        self.gate = Opaque()
        self.fc = nn.Conv2d(width, 8, 1)

    def forward(self, x):
        return self.fc(self.gate(self.act(self.conv(x)))).mean((2, 3))


def make(width=16, act="relu"):
    if width < 1:
        raise ValueError("width must be positive")
    return Net(width, act)
'''


def test_model_args_leaf_modules_and_capture_options(tmp_path, capsys):
    (tmp_path / "fac.py").write_text(FACTORY_FILE)
    torch.save(torch.randn(8, 3, 8, 8), tmp_path / "data.pt")
    base = ["inspect", f"{tmp_path}/fac.py:make", "--data", str(tmp_path / "data.pt"), "--format",
            "json", "--min-channels", "4", "--model-arg", "width=24", "--model-arg", "act=gelu"]
    assert main(base + ["--leaf-module", f"{tmp_path}/fac.py:Opaque", "--capture", "fx"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["summary"]["capture"] == "fx" and d["config"]["leaf_modules"][0].endswith("Opaque")
    assert {r["name"]: r["in_channels"] for r in d["layers"]} == {"conv": 3, "fc": 24}
    assert main(base + ["--capture", "export", "--exclude", "fc"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["summary"]["capture"].startswith("export")
    assert {r["name"]: r["reason"] for r in d["layers"]}["fc"] == "excluded by config.exclude"


@pytest.mark.parametrize("extra,msg", [
    (["--model-arg", "width=0"], "raised ValueError: width must be positive"),
    (["--model-arg", "depth=3"], "raised TypeError"),
    (["--model-arg", "width"], "must be name=value"),
    (["--leaf-module", "{tmp}/fac.py:Missing"], "has no 'Missing'"),
    (["--leaf-module", "{tmp}/fac.py:make"], "not an nn.Module class"),
    (["--capture", "fx"], "leaf_modules=(Opaque,)"),
])
def test_factory_and_option_errors_are_one_line(tmp_path, capsys, extra, msg):
    (tmp_path / "fac.py").write_text(FACTORY_FILE)
    torch.save(torch.randn(8, 3, 8, 8), tmp_path / "data.pt")
    argv = ["inspect", f"{tmp_path}/fac.py:make", "--data", str(tmp_path / "data.pt"),
            *[a.format(tmp=tmp_path) for a in extra]]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert msg in err and "Traceback" not in err and len(err.splitlines()) == 1, err


@pytest.mark.parametrize("command,extra", [
    ("inspect", []), ("compile", ["--out", "{tmp}/m.ispc"]), ("bench", []),
    ("tune", ["--val-data", "{tmp}/val.pt", "--max-drop", "1", "--out", "{tmp}/t.ispc"]),
])
def test_every_model_command_passes_the_factory_options(tmp_path, capsys, command, extra):
    (tmp_path / "fac.py").write_text(FACTORY_FILE)
    torch.save(torch.randn(8, 3, 8, 8), tmp_path / "data.pt")
    torch.save((torch.randn(8, 3, 8, 8), torch.zeros(8, dtype=torch.long)), tmp_path / "val.pt")
    argv = [command, f"{tmp_path}/fac.py:make", "--data", str(tmp_path / "data.pt"),
            "--model-arg", "width=0", *[a.format(tmp=tmp_path) for a in extra]]
    assert main(argv) == 2  # the factory saw width=0 (its own error), whatever the command
    err = capsys.readouterr().err.strip()
    assert "width must be positive" in err and len(err.splitlines()) == 1, err


@pytest.mark.parametrize("shape,msg", [((8, 3, 16), "(8, 3, 16)"),
                                       ((8, 5, 16, 16), "expects N x 3 x H x W")])
def test_calibration_data_the_model_cannot_take_is_one_line(tmp_path, capfd, shape, msg):
    (tmp_path / "net.py").write_text(MODEL_FILE)
    torch.save(torch.randn(*shape), tmp_path / "bad.pt")
    assert main(["inspect", f"{tmp_path}/net.py:make", "--data", str(tmp_path / "bad.pt"),
                 "--normalize", "none"]) == 2
    err = capfd.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and msg in err, err


@pytest.mark.parametrize("argv, names", [
    (["bench", "m"], []),
    (["bench", "m", "--runtimes"], "all"),
    (["bench", "m", "--runtimes", "onnxruntime", "eager"], ["eager", "onnxruntime"]),
    (["bench", "m", "--baseline", "openvino"], ["openvino"]),
    (["demo"], "all"),
    (["demo", "--runtimes", "none"], []),
])
def test_runtimes_option_picks_the_runtimes_timed(argv, names):
    from ispc.cli import _runtime_names, build_parser
    from ispc.runtimes import DENSE_RUNTIMES
    got = _runtime_names(build_parser().parse_args(argv))
    assert got == (list(DENSE_RUNTIMES) if names == "all" else names)
