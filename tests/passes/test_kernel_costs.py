"""kernel_costs: the shape-based cost model's predictions and the kernels measured selection
times (the selection itself: test_select_kernels.py)."""
from __future__ import annotations

import pytest
import torch

import ispc
from ispc.modules import GatedConv2d, NhwcDenseConv2d
from ispc.ops import native
from ispc.ops.gated_conv import TOPK
from ispc.passes import kernel_costs
from ispc.passes.kernel_costs import LARGE_LAYER_MACS, candidates, in_program, predicted_strategy


def test_largest_layers_are_predicted_to_oneDNN_on_gathered_channels():
    mod = GatedConv2d(torch.randn(128, 128, 3, 3), None, stride=(1, 1), padding=(1, 1),
                      dilation=(1, 1), mode="topk", threshold=0.0, k=64)
    big, small = 112 * 112, 28 * 28
    assert 128 * 128 * 9 * big >= LARGE_LAYER_MACS > 128 * 128 * 9 * small
    assert predicted_strategy(mod, big) == ("gather", None)
    if native.available():
        assert predicted_strategy(mod, small) == ("native", native.ORIENT_CL)
        assert predicted_strategy(mod, 7 * 7) == ("native", native.ORIENT_CL)
        one = GatedConv2d(torch.randn(128, 128, 1, 1), None, stride=(1, 1), padding=(0, 0),
                          dilation=(1, 1), mode="topk", threshold=0.0, k=64)
        assert predicted_strategy(one, small) == ("native", native.ORIENT_PIX)
        assert predicted_strategy(one, 7 * 7) == ("native", native.ORIENT_CO)
        # as many MACs on a 28x28 map: the channels-last orientation beats oneDNN there
        wide = GatedConv2d(torch.randn(512, 512, 3, 3), None, stride=(1, 1), padding=(1, 1),
                           dilation=(1, 1), mode="topk", threshold=0.0, k=256)
        assert 512 * 512 * 9 * small >= LARGE_LAYER_MACS
        assert predicted_strategy(wide, small) == ("native", native.ORIENT_CL)
        few = GatedConv2d(torch.randn(16, 16, 3, 3), None, stride=(1, 1), padding=(1, 1),
                          dilation=(1, 1), mode="topk", threshold=0.0, k=8)
        assert predicted_strategy(few, 32 * 32) == ("native", native.ORIENT_PIX)
        assert predicted_strategy(few, 8 * 8) == ("native", native.ORIENT_CL)


def test_layers_whose_kernel_covers_the_input_take_the_one_position_kernel():
    # VGG-16's first classifier layer as a convolution: 25088 -> 4096 is ~100 M MACs per image
    mod = GatedConv2d(torch.randn(4096, 512, 7, 7), None, stride=(1, 1), padding=(0, 0),
                      dilation=(1, 1), mode="topk", threshold=0.0, k=256)
    if native.available():
        assert predicted_strategy(mod, 1, (7, 7)) == ("native", native.ORIENT_FULL)
        assert candidates(mod, (7, 7))["native:full"] == ("native", native.ORIENT_FULL)
    assert "native:full" not in candidates(mod, (9, 9))
    assert predicted_strategy(mod, 9, (9, 9)) != ("native", native.ORIENT_FULL)


def test_channels_last_maps_offer_and_predict_the_nhwc_kernel():
    mod = GatedConv2d(torch.randn(64, 64, 3, 3), None, stride=(1, 1), padding=(1, 1),
                      dilation=(1, 1), mode="topk", threshold=0.0, k=32)
    assert "nhwc" not in candidates(mod, (28, 28))  # on NCHW maps it would run gather
    if native.available():
        assert candidates(mod, (28, 28), channels_last=True) == {"nhwc": ("nhwc", None),
                                                                 "gather": ("gather", None)}
        assert predicted_strategy(mod, 28 * 28, channels_last=True) == ("nhwc", None)
        assert predicted_strategy(mod, 28 * 28) == ("native", native.ORIENT_CL)
    else:
        assert "nhwc" not in candidates(mod, (28, 28), channels_last=True)


@pytest.mark.skipif(not native.available(), reason="the native kernel is not built here")
@pytest.mark.parametrize("mode", ["topk", "dense", "depthwise"])
def test_in_program_computes_what_the_layers_own_call_computes(mode):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 16, 9, 7, generator=g).contiguous(memory_format=torch.channels_last)
    if mode == "depthwise":
        kernel = native.DepthwiseConv3x3(torch.randn(16, 1, 3, 3, generator=g), torch.randn(16))
        want = kernel(x)
        call = in_program(kernel, x)
    else:
        kernel = native.NhwcConv(torch.randn(8, 16, 3, 3, generator=g), torch.randn(8), stride=2,
                                 padding=1)
        scale = torch.rand(16, generator=g) + 0.5
        code = TOPK if mode == "topk" else native.DENSE
        want = kernel(x, code, scale=scale, k=5) if mode == "topk" else kernel(x)
        call = in_program(kernel, x, code, scale, 0.0, 5, 0)
    for _ in range(2):  # the output buffer is written again by every call
        call.out.zero_()
        call()
        assert torch.equal(call.out, want)


@pytest.mark.skipif(not native.available(), reason="the native kernel is not built here")
def test_measured_layers_left_dense_on_channels_last_maps_run_in_the_program(monkeypatch):
    # gated slower than dense: the layer is left dense; on a channels-last map as the runner's
    # dense kernel (timed in a program), on an NCHW map as oneDNN
    monkeypatch.setattr(kernel_costs, "time_candidates",
                        lambda fns, rounds, **kw: {k: 1.0 if k == "dense" else 2.0 for k in fns})
    mod = GatedConv2d(torch.randn(8, 16, 1, 1), torch.randn(8), stride=(1, 1), padding=(0, 0),
                      dilation=(1, 1), mode="topk", threshold=0.0, k=8)
    graph = torch.fx.Graph()
    node = graph.call_module("conv", (graph.placeholder("x"),))
    cfg = ispc.GatingConfig(latency_aware=True, latency_rounds=1)
    x = torch.randn(2, 16, 5, 5)
    for xin, kind in ((x.contiguous(memory_format=torch.channels_last), NhwcDenseConv2d),
                      (x, torch.nn.Conv2d)):
        m = kernel_costs.measure(mod, xin, node, cfg)
        assert not m.gated and type(m.plain) is kind
        with torch.no_grad():
            assert torch.allclose(m.plain(xin), torch.nn.functional.conv2d(x, mod.weight, mod.bias),
                                  atol=1e-5)


def test_built_runner_times_the_model_as_built_and_leaves_the_graph_as_it_was():
    """``built_runner``: a copy with the plain layers on the native kernels, epilogues fused and
    native programs, computing what the graph computes; the graph's modules and records (shared
    by a plain deep copy's nodes) untouched."""
    if not native.available():
        pytest.skip(f"native kernel not built here: {native.unavailable_reason()}")
    from ispc import pipeline
    from ispc.examples.models import resnet20
    from ispc.records import records

    names = pipeline.COMPILE[:pipeline.COMPILE.index("select_kernels") + 1]
    data = [torch.randn(8, 3, 32, 32) for _ in range(2)]
    gm, state = pipeline.run(resnet20().eval(), data, config=ispc.GatingConfig(channels_last=True),
                             pipeline=names, progress=False)
    before = {n: (gm.get_submodule(n.target) if n.op == "call_module" else None,
                  records(n).kernel, records(n).epilogue) for n in gm.graph.nodes}
    from ispc.modules import dense_conv

    plain = dense_conv(gm.get_submodule("layer1.0.conv1"))  # a layer left dense: moved
    state.pending = pipeline.COMPILE[len(names):]  # as select_kernels sees it in ispc.compile
    runner = kernel_costs.built_runner(gm, state, {"layer1.0.conv1": plain})
    assert runner._programs and runner.gm is not gm
    built = list(runner.gm.modules())
    assert type(runner.gm.get_submodule("layer1.0.conv1")) is NhwcDenseConv2d
    assert any(isinstance(m, GatedConv2d) and m.act is not None for m in built)  # fused epilogues
    assert not any(type(m) is NhwcDenseConv2d for m in gm.modules())
    assert isinstance(gm.get_submodule("layer1.0.conv1"), GatedConv2d)
    assert before == {n: (gm.get_submodule(n.target) if n.op == "call_module" else None,
                          records(n).kernel, records(n).epilogue) for n in gm.graph.nodes}
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        gated = gm.get_submodule("layer1.0.conv1")
        block = gm.get_submodule("layer1.0")
        block.conv1 = plain
        want, got = gm(x), runner(x)
        block.conv1 = gated
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()


def test_timing_input_repeats_the_calibration_inputs_to_the_latency_batch():
    from ispc.passes.base import PassState
    a, b = torch.randn(2, 3, 4, 4), torch.randn(1, 3, 4, 4)
    st = PassState(config=ispc.GatingConfig(latency_batch_size=5), calibration_cache=[a, b])
    x = kernel_costs.timing_input(st)
    torch.testing.assert_close(x, torch.cat([a, b, a, b])[:5], rtol=0, atol=0)
    assert kernel_costs.timing_input(PassState(config=ispc.GatingConfig())) is None


@pytest.mark.skipif(not native.available(), reason="the native kernel is not built here")
@pytest.mark.parametrize("fastest", ["nhwc", "nhwc:winograd"])
def test_3x3_layers_time_the_nhwc_kernel_by_winograd_and_directly(monkeypatch, fastest):
    """A 3x3 stride-1 layer's nhwc kernel is timed by the rule's algorithm ("nhwc"; here direct:
    the node has no shape, so no output size) and by the other one; the record and the module
    follow the timing, and both compute the layer."""
    monkeypatch.setattr(kernel_costs, "time_candidates",
                        lambda fns, rounds, **kw: {k: 0.5 if k == fastest else 1.0 for k in fns})
    g = torch.Generator().manual_seed(0)
    mod = GatedConv2d(torch.randn(48, 32, 3, 3, generator=g), torch.randn(48, generator=g),
                      stride=(1, 1), padding=(1, 1), dilation=(1, 1), mode="topk", threshold=0.0,
                      k=16)
    graph = torch.fx.Graph()
    node = graph.call_module("conv", (graph.placeholder("x"),))
    cfg = ispc.GatingConfig(latency_aware=True, latency_rounds=1)
    xin = torch.randn(2, 32, 12, 12, generator=g).contiguous(memory_format=torch.channels_last)
    m = kernel_costs.measure(mod, xin, node, cfg)
    assert set(m.times) == {"dense", "nhwc", "nhwc:winograd", "gather"}
    choice = m.choice(cfg)
    assert choice.strategy == "nhwc" and choice.winograd is (fastest == "nhwc:winograd")
    assert choice.label == ("nhwc:winograd" if choice.winograd else "nhwc:direct")
    ispc.passes.apply_kernel(node, choice, mod)
    assert mod.prepared.winograd is choice.winograd
    direct = GatedConv2d(mod.weight, mod.bias, stride=(1, 1), padding=(1, 1), dilation=(1, 1),
                         mode="topk", threshold=0.0, k=16)
    direct.set_strategy("nhwc", winograd=False)
    with torch.no_grad():
        assert torch.allclose(mod(xin), direct(xin), atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not native.available(), reason="the native kernel is not built here")
def test_layers_that_do_not_fit_winograd_time_one_nhwc_kernel(monkeypatch):
    monkeypatch.setattr(kernel_costs, "time_candidates",
                        lambda fns, rounds, **kw: {k: 1.0 for k in fns})
    graph = torch.fx.Graph()
    node = graph.call_module("conv", (graph.placeholder("x"),))
    cfg = ispc.GatingConfig(latency_aware=True, latency_rounds=1)
    xin = torch.randn(2, 32, 12, 12).contiguous(memory_format=torch.channels_last)
    for shape, stride in (((48, 32, 1, 1), 1), ((48, 32, 3, 3), 2), ((48, 8, 3, 3), 1)):
        mod = GatedConv2d(torch.randn(*shape), None, stride=(stride, stride), padding=(1, 1),
                          dilation=(1, 1), mode="topk", threshold=0.0, k=4)
        x = xin[:, :shape[1]].contiguous(memory_format=torch.channels_last)
        m = kernel_costs.measure(mod, x, node, cfg)
        assert not any(k.startswith("nhwc:") for k in m.times) and m.winograd is None
