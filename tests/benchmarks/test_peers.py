"""benchmarks/peers.py: the options that need no timing (the timing itself is ispc.runtimes',
tested in tests/ispc/test_runtimes.py)."""
import os

import pytest


def test_max_isa_refuses_onnxruntime(benchmark_script):
    peers = benchmark_script("peers.py")
    why = peers.limit_isa("avx2", ["onnxruntime", "openvino"])
    assert "ONNX Runtime" in why and "--runtimes" in why
    assert peers.limit_isa(None, ["onnxruntime"]) is None


def test_max_isa_environment_reaches_the_workers(benchmark_script, monkeypatch):
    """Once the environment limits this process, no re-exec: the workers copy os.environ."""
    peers = benchmark_script("peers.py")
    for k, v in peers.MAX_ISA_ENV["avx2"].items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(os, "execv", lambda *a: pytest.fail("re-executed with the limit already set"))
    assert peers.limit_isa("avx2", ["openvino", "eager"]) is None
    from ispc.dense_route import worker_env
    env = worker_env(2, "openvino")
    assert env["ONEDNN_MAX_CPU_ISA"] == "AVX2" and env["ISPC_NATIVE_FLAGS"] == "-mno-avx512f"


def test_max_isa_reexecutes_with_the_limit(benchmark_script, monkeypatch):
    peers = benchmark_script("peers.py")
    env = {k: v for k, v in os.environ.items() if k not in peers.MAX_ISA_ENV["avx2"]}
    monkeypatch.setattr(os, "environ", env)  # the limit must not leak into later tests' builds
    calls = []
    monkeypatch.setattr(os, "execv", lambda exe, argv: calls.append((exe, argv)))
    peers.limit_isa("avx2", ["openvino"])
    assert calls and env["ONEDNN_MAX_CPU_ISA"] == "AVX2" and env["ATEN_CPU_CAPABILITY"] == "avx2"


def test_max_isa_routes_only_through_openvino(benchmark_script, monkeypatch):
    """Under --max-isa a dense route may not run ONNX Runtime, which ignores the limit (its
    AVX-512 kernels would stand in an emulated AVX2 figure)."""
    peers = benchmark_script("peers.py")
    assert peers.route_for(None) == "auto"
    monkeypatch.setattr(peers.dense_route, "installed", lambda r: True)
    assert peers.route_for("avx2") == "openvino"
    monkeypatch.setattr(peers.dense_route, "installed", lambda r: r != "openvino")
    assert peers.route_for("avx2") == "off"
