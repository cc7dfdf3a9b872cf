"""peers.py --interleave (ispc.runtimes.time_runtimes(interleave=True)): the workers' pipe
protocol, the order of blocks in a round, the paired ratios of blocks, a worker that dies, and
the JSON that old runs and new ones merge from. A tiny model, a few blocks of a few calls."""
from __future__ import annotations

import json
import statistics

import numpy as np
import pytest
import torch
from torch import nn

import ispc
from ispc import dense_route as route
from ispc import runtimes as rt
from ispc.benchmark import input_batches

SHAPE = (3, 16, 16)


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(16, 10)).eval()


def test_serve_protocol_blocks_on_request_then_quits(tmp_path):
    """A worker answers its result line once prepared, then one line per block asked, idle in
    between, and exits on quit."""
    model = tiny_model()
    batches = input_batches(1, input_shape=SHAPE, pool=2)
    onnx = route.export_dense_onnx(model, batches[0], tmp_path / "m.onnx")
    np.save(tmp_path / "inputs.npy", torch.stack(batches).numpy())
    srv = route._Server({"runtime": "onnxruntime", "artifact": str(onnx), "threads": 1,
                         "inputs": str(tmp_path / "inputs.npy")}, tmp_path, "w0")
    try:
        first = srv.reply(120)
        assert first["status"] == "ok" and first["probe_ms"] > 0 and "version" in first
        out = np.load(srv.job["check_output"])
        assert route.rel_err(out, model(batches[0]).detach().numpy()) < 1e-4
        for calls in (3, 1):
            block = srv.ask({"warmup": 1, "calls": calls}, 60)
            assert block["status"] == "ok" and len(block["times_ms"]) == calls
            assert block["cpu_share"] >= 0
    finally:
        srv.close()
    assert srv.proc.returncode == 0


class FakeServer:
    """A stand-in for route._Server that logs the order of blocks (no process)."""

    log: list[str] = []
    die: dict[str, int] = {}  # tag -> the block at which it "exits"

    def __init__(self, job, job_dir, tag):
        self.job = {**job, "check_output": str(job_dir / f"{tag}.out.npy")}
        self.tag, self.name, self.blocks = tag, job["name"], 0

    def reply(self, timeout_s):
        return {"status": "ok", "probe_ms": 1.0, "version": "fake", "prepare_s": 0.5}

    def ask(self, command, timeout_s):
        self.blocks += 1
        if FakeServer.die.get(self.name) == self.blocks:
            return {"status": "error", "note": "worker exited with status -9: killed"}
        FakeServer.log.append(self.name)
        return {"status": "ok", "times_ms": [float(len(self.name))] * command["calls"],
                "cpu_share": 1.0}

    def close(self):
        pass


@pytest.fixture
def fake_servers(monkeypatch):
    FakeServer.log, FakeServer.die = [], {}
    monkeypatch.setattr(route, "_Server", FakeServer)
    monkeypatch.setattr(route.time, "sleep", lambda s: None)
    return FakeServer


def _jobs(*names):
    return {n: {"runtime": "onnxruntime", "artifact": "-", "name": n} for n in names}


def test_rounds_rotate_the_order(fake_servers):
    out = route.time_interleaved(_jobs("a", "bb", "ccc"), torch.zeros(1, 1, 1), threads=1,
                                 rounds=3, warmup=0, block_s=0.0, min_calls=4, max_calls=4)
    log = fake_servers.log
    assert [log[i:i + 3] for i in (0, 3, 6)] == [["a", "bb", "ccc"], ["bb", "ccc", "a"],
                                                 ["ccc", "a", "bb"]]
    assert out["bb"]["blocks_ms"] == [[2.0] * 4] * 3 and out["bb"]["calls"] == 4
    assert out["a"]["info"]["version"] == "fake" and out["a"]["rounds_ms"] == [1.0] * 3


def test_shuffled_rounds_run_every_candidate_once_each(fake_servers):
    route.time_interleaved(_jobs("a", "bb", "ccc", "dddd"), torch.zeros(1, 1, 1), threads=1,
                           rounds=6, warmup=0, block_s=0.0, min_calls=1, max_calls=1, shuffle=3)
    log = fake_servers.log
    rounds = [log[i:i + 4] for i in range(0, 24, 4)]
    assert all(sorted(r) == ["a", "bb", "ccc", "dddd"] for r in rounds)
    assert len({tuple(r) for r in rounds}) > 1  # not one fixed order


def test_a_worker_that_exits_mid_run_is_named_with_its_round(fake_servers):
    fake_servers.die = {"bb": 2}
    out = route.time_interleaved(_jobs("a", "bb"), torch.zeros(1, 1, 1), threads=1, rounds=3,
                                 warmup=0, block_s=0.0, min_calls=1, max_calls=1)
    assert out["bb"]["ms"] is None and out["bb"]["rounds_ms"] == []
    assert "round 2" in out["bb"]["note"] and "exited with status -9" in out["bb"]["note"]
    assert len(out["a"]["rounds_ms"]) == 3  # the others go on


@pytest.fixture(scope="module")
def interleaved():
    model = tiny_model()
    calib = [torch.randn(8, *SHAPE) for _ in range(2)]
    compiled = ispc.compile(model, calib, config=ispc.GatingConfig(keep_ratio=0.5, mode="topk",
                                                                   dense_route="off"),
                            progress=False)
    batches = input_batches(1, input_shape=SHAPE, pool=2)
    timings = rt.time_runtimes(model, {"ispc 0.5": compiled}, batches,
                               runtimes=["onnxruntime", "eager"], rounds=3, calls=4, warmup=1,
                               threads=1, name="tiny", progress=False, interleave=True,
                               settle_s=0.0)
    return model, compiled, timings


def test_interleaved_records_blocks_and_pairs_them(interleaved):
    _, _, timings = interleaved
    assert [t.runtime for t in timings] == ["onnxruntime", "eager", "ispc 0.5"]
    for t in timings:
        assert t.available, t.note
        assert t.method == "interleaved" and len(t.round_medians_ms) == 3
        assert len(t.times_ms) == 12 and len(t.prepare_s) == 1
        assert t.extra["blocks"] == 3 and t.extra["block_calls"] == 4
        assert t.max_rel_err is not None and t.max_rel_err < 1e-4
    (c,) = rt.compare(timings)
    dense = [t for t in timings if t.kind == "dense"]
    ispc_t = timings[-1]
    ratios = [min(d.round_medians_ms[r] for d in dense) / ispc_t.round_medians_ms[r]
              for r in range(3)]
    assert c.paired_speedup == pytest.approx(statistics.median(ratios))
    assert c.paired_range == pytest.approx((min(ratios), max(ratios)))
    base = next(t for t in dense if t.runtime == c.baseline)  # the fastest by medians, alone
    alone = [base.round_medians_ms[r] / ispc_t.round_medians_ms[r] for r in range(3)]
    assert c.paired_baseline_speedup == pytest.approx(statistics.median(alone))
    assert c.paired_baseline_speedup >= c.paired_speedup


def test_interleave_refuses_in_process():
    model = tiny_model()
    with pytest.raises(ispc.errors.ConfigError, match="interleave"):
        rt.time_runtimes(model, None, input_batches(1, input_shape=SHAPE, pool=1),
                         interleave=True, in_process=True, progress=False)


def test_a_worker_killed_mid_run_is_recorded_with_a_clear_note(monkeypatch):
    ask = route._Server.ask
    count = {}

    def killing_ask(self, command, timeout_s):
        count[self.tag] = count.get(self.tag, 0) + 1
        if self.tag == "w0" and count[self.tag] == 2:  # the first runtime's worker, round 2
            self.proc.kill()
            self.proc.wait()
        return ask(self, command, timeout_s)

    monkeypatch.setattr(route._Server, "ask", killing_ask)
    model = tiny_model()
    timings = rt.time_runtimes(model, None, input_batches(1, input_shape=SHAPE, pool=1),
                               runtimes=["onnxruntime", "eager"], rounds=3, calls=2,
                               warmup=0, threads=1, progress=False, interleave=True, settle_s=0.0)
    dead, alive = timings
    assert not dead.available and dead.method == "interleaved"
    assert "worker failed" in dead.note and "round 2" in dead.note and "status -9" in dead.note
    assert alive.available and len(alive.round_medians_ms) == 3


def test_merge_reads_old_json_beside_interleaved(interleaved, benchmark_script, tmp_path):
    """Records from before the method field read as processes; one table names both methods."""
    peers = benchmark_script("peers.py")
    _, _, timings = interleaved
    old = [{k: v for k, v in t.to_dict().items() if k != "method"}
           for t in timings if t.kind == "dense"]
    for d in old:
        d["model"] = "old"
    (tmp_path / "old.json").write_text(json.dumps({"machine": {}, "timings": old}))
    (tmp_path / "new.json").write_text(rt.runtimes_json(timings, machine={}, method="interleaved"))
    merged, _, _ = peers.merge([str(tmp_path / "old.json"), str(tmp_path / "new.json")])
    assert [t.method for t in merged[:2]] == ["processes", "processes"]
    table = rt.runtimes_table(merged)
    assert "| method" in table and "processes" in table and "interleaved" in table
    lines = peers.summary_lines(merged, [], {}, "best")
    assert any(s.startswith("Timed by interleaved") and "3 rounds" in s for s in lines)
    assert any("spread: tiny b1 ORT (interleaved): 3 block medians" in s for s in lines)
    # an old run alone keeps the old table
    assert "method" not in rt.runtimes_table(merged[:2])


def test_timing_plan_defaults(benchmark_script):
    peers = benchmark_script("peers.py")
    ns = lambda **kw: type("A", (), {"interleave": False, "rounds": None, "calls": 30,
                                     "batched_calls": 5, "warmup": 5, "block_calls": 15,
                                     "batched_block_calls": 3, "block_warmup": None, **kw})()
    assert peers.timing_plan(ns(), 1) == (3, 30, 5)
    assert peers.timing_plan(ns(), 32) == (3, 5, 1)
    assert peers.timing_plan(ns(interleave=True), 1) == (12, 15, 5)
    assert peers.timing_plan(ns(interleave=True), 32) == (6, 3, 1)
    assert peers.timing_plan(ns(interleave=True, rounds=4, block_warmup=0), 1) == (4, 15, 0)


def test_interleave_with_in_process_is_refused(benchmark_script):
    peers = benchmark_script("peers.py")
    with pytest.raises(SystemExit):
        peers.main(["--interleave", "--in-process", "--models", "resnet18"])
