"""benchmarks/gpu/run.py: its arguments, its refusal without a GPU, and a dry run of the whole
harness on the CPU (Triton's interpreter, tiny shapes) in a subprocess, as the GPU session runs it."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[3]
SCRIPT = ROOT / "benchmarks" / "gpu" / "run.py"
HAS_TRITON = importlib.util.find_spec("triton") is not None


@pytest.fixture()
def run_py(benchmark_script):
    return benchmark_script("gpu/run.py", name="gpu_run")


def test_arguments(run_py, monkeypatch, tmp_path):
    monkeypatch.setenv("OUT", str(tmp_path))
    args = run_py.parse_args([])
    assert args.out == str(tmp_path) and args.sections == list(run_py.SECTIONS)
    assert args.batches == [32, 1] and args.keep == 0.5 and not args.dry_run
    args = run_py.parse_args(["--sections", "layers", "--batches", "8", "--keep", "0.25"])
    assert args.sections == ["layers"] and args.batches == [8] and args.keep == 0.25
    for bad in (["--keep", "0"], ["--batches", "0"], ["--sections", "nope"]):
        with pytest.raises(SystemExit):
            run_py.parse_args(bad)


def test_layer_table_is_resnet50_and_vgg16_3x3(benchmark_script):
    mod = benchmark_script("gpu/run.py")
    assert all(k == 3 for *_, k, _ in mod.LAYERS)
    assert {n.split()[0] for n, *_ in mod.LAYERS} == {"r50", "vgg"}
    assert set(mod.TOLERANCE) == {"fp32-ieee", "fp32-tf32", "bf16", "fp16"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a CPU machine")
def test_refuses_to_run_without_cuda(run_py, tmp_path, capsys):
    assert run_py.main(["--out", str(tmp_path)]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


@pytest.mark.skipif(not HAS_TRITON, reason="the dry run interprets the Triton kernels")
def test_dry_run_of_the_whole_harness(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(tmp_path),
                           "--sections", "check", "layers", "models"], env=env,
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    if proc.returncode and "only 0-dimensional arrays can be converted" in proc.stderr:
        pytest.skip("this Triton's CPU interpreter cannot run the kernels under NumPy 2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "gpu_results.json").read_text())
    assert res["environment"]["dry_run"] is True
    chk = res["check"]
    assert chk["cases"] == 3 and chk["selection_mismatches"] == 0
    assert chk["layout_mismatches"] == 0
    assert all(v["failed"] == 0 for v in chk["by_variant"].values())
    (layer,) = res["layers"]
    for key in ("dense_nchw_graph_ms", "gated_nhwc_ms", "select_nhwc_graph_ms",
                "conv_nhwc_graph_ms", "speedup_graph", "speedup"):
        assert layer[key] > 0
    (model,) = res["models"]
    assert "error" not in model, model.get("traceback")
    assert model["gated_all_speedup"] > 0 and model["mac_ratio"] > 1
    assert "model tiny b2" in proc.stdout  # the summary table closes the output
