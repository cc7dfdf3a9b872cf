"""Calibration statistics merge across torch.distributed ranks (two gloo processes on the CPU)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(),
                                reason="torch.distributed is not available in this build")

SCRIPT = textwrap.dedent("""
    import json, os, sys
    import torch, torch.distributed as dist
    import ispc
    from ispc.examples.models import resnet20

    def data(seed):
        g = torch.Generator().manual_seed(seed)
        return [torch.randn(8, 3, 32, 32, generator=g) for _ in range(2)]

    torch.manual_seed(0)
    model = resnet20().eval()
    cfg = ispc.GatingConfig(keep_ratio=0.5)
    mode = sys.argv[1]
    if mode == "single":
        batches = data(0) + data(1)
    else:
        rank, world = int(sys.argv[2]), 2
        dist.init_process_group("gloo", init_method="file://" + sys.argv[3], rank=rank,
                                world_size=world)
        batches = data(rank)
    c = ispc.compile(model, batches, config=cfg, progress=False)
    out = {r.name: [r.threshold, r.cv] for r in c.report.gated_layers}
    out["_samples"] = c.report.summary["calibration_samples"]
    print("RESULT" + json.dumps(out))
    if mode != "single":
        dist.destroy_process_group()
""")


def _result(proc_out: str) -> dict:
    line = next(l for l in proc_out.splitlines() if l.startswith("RESULT"))
    return json.loads(line[len("RESULT"):])


def test_two_ranks_give_single_process_thresholds(tmp_path):
    script = tmp_path / "calib.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, str(script), "single"], capture_output=True, text=True,
                            env=env, timeout=300)
    assert single.returncode == 0, single.stderr
    store = tmp_path / "store"
    procs = [subprocess.Popen([sys.executable, str(script), "dist", str(r), str(store)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for r in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
    ref = _result(single.stdout)
    r0, r1 = (_result(o) for o, _ in outs)
    assert r0 == r1  # every rank chose the same gates
    assert r0["_samples"] == ref["_samples"] == 32
    assert r0.keys() == ref.keys()
    for name in ref:
        if name.startswith("_"):
            continue
        assert r0[name][0] == pytest.approx(ref[name][0], rel=1e-6)
        assert r0[name][1] == pytest.approx(ref[name][1], rel=1e-6)
