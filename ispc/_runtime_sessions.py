"""ONNX Runtime sessions and OpenVINO compiled models as ispc sets them up, in one place for the
dense route (``ispc.dense_route``) and the benchmark's timing workers (``ispc/_runtime_worker.py``,
which loads this file by path: it imports no torch and no ispc, so that no other thread pool sits
beside the runtime it times). Imports nothing but the runtime asked for."""
from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["ort_session", "ov_compiled"]


def ort_session(model: bytes | str | Path, threads: int, *, stop_spinning: bool) -> Any:
    """An ONNX Runtime CPU session of ``model`` (ONNX bytes or a path): ``threads`` intra-op
    threads, one inter-op, sequential, every graph optimization. ``stop_spinning``: the workers
    spin within a call and stop when it returns (``session.force_spinning_stop``), as the route
    needs in a torch process (docs/dense_route.md)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if stop_spinning:
        so.add_session_config_entry("session.force_spinning_stop", "1")
    return ort.InferenceSession(model if isinstance(model, bytes) else str(model), so,
                                providers=["CPUExecutionProvider"])


def ov_compiled(model: bytes | str | Path, shape: tuple[int, ...] | list[int], threads: int, *,
                precision: str | None = "f32") -> Any:
    """An OpenVINO CPU compiled model of ``model`` (ONNX bytes or a path) reshaped to the static
    input ``shape`` (OpenVINO's latency guide), LATENCY hint, ``threads`` inference threads;
    ``precision``: ``INFERENCE_PRECISION_HINT`` (None: the CPU's default, bf16 with AMX)."""
    import openvino as ov

    core = ov.Core()
    read = core.read_model(model, b"") if isinstance(model, bytes) else core.read_model(str(model))
    read.reshape({read.inputs[0].get_any_name(): ov.PartialShape(list(shape))})
    config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads}
    if precision is not None:
        config["INFERENCE_PRECISION_HINT"] = precision
    return core.compile_model(read, "CPU", config)
