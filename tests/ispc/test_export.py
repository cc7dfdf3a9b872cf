"""torch.export of compiled models: one gated op per layer, dynamic batch, equal to eager."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import ispc
from conftest import rel_err
from zoo import SmallResidualNet
from ispc.export import GATED_OP, eval_mode, export_program, gated_nodes


@pytest.fixture(scope="module", params=["topk", "threshold"])
def compiled(request):
    torch.manual_seed(0)
    model = SmallResidualNet().eval()
    data = [torch.randn(8, 3, 16, 16) for _ in range(2)]
    cfg = ispc.GatingConfig(keep_ratio=0.5, mode=request.param)
    return ispc.compile(model, data, config=cfg, progress=False)


def test_export_dynamic_batch_equals_eager(compiled):
    ep = export_program(compiled, torch.randn(1, 3, 16, 16))  # batch 1 example: widened to 2
    assert isinstance(ep, torch.export.ExportedProgram)
    run = ep.module()
    with torch.no_grad():
        for n in (1, 3, 6):
            x = torch.randn(n, 3, 16, 16)
            got, want = run(x), compiled(x)
            assert got.shape == (n, 10)
            assert rel_err(got, want) < 1e-5


def test_exported_graph_has_one_gated_op_per_gated_layer(compiled):
    ep = export_program(compiled, torch.randn(4, 3, 16, 16))
    nodes = gated_nodes(ep)
    gated = compiled.gated_modules()
    assert len(gated) >= 1
    assert len(nodes) == len(gated)
    assert all(n.target is GATED_OP for n in nodes)
    # the batch is symbolic in the gated op's input, the other dims are not
    n0 = nodes[0].args[0].meta["val"].shape
    assert not isinstance(n0[0], int) and all(isinstance(d, int) for d in n0[1:])
    mode_code = ispc.modules.MODE_CODES[compiled.config.mode]
    assert all(n.args[10] == mode_code for n in nodes)
    # gating is really on (not a keep-everything layer): threshold > 0 / k < C
    for n in nodes:
        cin = n.args[1].meta["val"].shape[1]
        assert (n.args[11] > 0) if compiled.config.mode == "threshold" else (0 < n.args[12] < cin)


def test_plain_torch_export_call_works(compiled):
    """What the issue asks: torch.export.export(graph_module, dynamic_shapes=...) directly."""
    batch = torch.export.Dim("batch")
    x = torch.randn(3, 3, 16, 16)
    ep = torch.export.export(compiled.graph_module, (x,), dynamic_shapes=({0: batch},))
    x5 = torch.randn(5, 3, 16, 16)
    with torch.no_grad():
        assert rel_err(ep.module()(x5), compiled(x5)) < 1e-5


def test_static_export_rejects_other_batch(compiled):
    ep = export_program(compiled, torch.randn(3, 3, 16, 16), dynamic_batch=False)
    with torch.no_grad():
        ep.module()(torch.randn(3, 3, 16, 16))
        with pytest.raises(Exception):
            ep.module()(torch.randn(4, 3, 16, 16))


def test_eval_mode_restores_training_flags():
    m = nn.Sequential(nn.Dropout(), nn.Sequential(nn.Dropout()))
    m.train()
    m[1].eval()
    with eval_mode(m):
        assert not any(x.training for x in m.modules())
    assert m.training and m[0].training and not m[1].training and not m[1][0].training
