"""Hugging Face vision models (transformers, small configs, no download): captured with
torch.export, lifted to their modules, compiled exactly at keep 1.0, gated at keep 0.5, called
as the original is (``pixel_values=x`` or positionally, a ``ModelOutput`` back), saved and
loaded, and run by ONNX Runtime."""
from __future__ import annotations

import contextlib
import io

import pytest
import torch

import ispc
import zoo
from conftest import gated_layer_errors, rel_err

transformers = pytest.importorskip("transformers")

#: a gated layer of each kind every model must have (its report name)
GATED = {
    "convnext": "convnext.encoder.stages.0.layers.0.pwconv1",   # nn.Linear on an N x H x W x C map
    "vit": "vit.layers.0.mlp.fc1",                              # the MLP, on N x T x C tokens
    "swin": "swin.encoder.layers.0.blocks.0.mlp.fc1",
    "mobilenet_v2": "mobilenet_v2.layer.1.expand_1x1.convolution",
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def _data(seed=0, batches=2):
    g = torch.Generator().manual_seed(seed)
    return [transformers.BatchFeature({"pixel_values": torch.randn(4, 3, 32, 32, generator=g),
                                       "labels": torch.randint(0, 10, (4,), generator=g)})
            for _ in range(batches)]


@pytest.mark.parametrize("name", zoo.HF_MODELS)
def test_keep_all_equals_the_original_called_its_way(name):
    model = zoo.hf_model(name)
    c = ispc.compile(model, _data(), config=ispc.GatingConfig(keep_ratio=1.0, min_channels=8),
                     progress=False)
    assert c.report.summary["capture"] == "export (dynamic batch)"
    assert not any(r.name.startswith("conv2d") or r.name.startswith("linear") for r in c.report.layers)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        want = model(pixel_values=x)
        by_name, positional = c(pixel_values=x), c(x[:1])
    assert type(by_name) is type(want) and type(positional) is type(want)
    assert rel_err(by_name.logits, want.logits) <= 1e-4
    assert rel_err(positional.logits, want.logits[:1]) <= 1e-4
    with torch.no_grad():
        assert c(pixel_values=x, labels=None).logits.shape == want.logits.shape
    with pytest.raises(ispc.DataError, match="return_dict"):
        c(pixel_values=x, return_dict=False)


@pytest.mark.slow
@pytest.mark.parametrize("name", zoo.HF_MODELS)
def test_gated_saved_loaded_and_onnx(name, tmp_path):
    model = zoo.hf_model(name)
    c = ispc.compile(model, _data(), config=ispc.GatingConfig(keep_ratio=0.5, mode="topk",
                                                               min_channels=8), progress=False)
    s = c.report.summary
    assert s["layers_gated"] >= 2 and s["mac_reduction"] > 0.1, c.report
    if name in GATED:
        assert c.report.layer(GATED[name]).gated
    if name == "swin":  # attention over windows reads N * windows rows: not per instance
        row = c.report.layer("swin.encoder.layers.0.blocks.0.attention.q_proj")
        assert not row.gated and "windows" in row.reason
    x = torch.randn(2, 3, 32, 32)
    errs = gated_layer_errors(c, x)
    assert errs and max(errs.values()) <= 1e-5, errs
    with torch.no_grad():
        want = c(x)
    ispc.save(c, tmp_path / "m.ispc")
    loaded = ispc.load(tmp_path / "m.ispc")
    assert set(loaded.gated_modules()) == set(c.gated_modules())
    assert {type(m) for m in loaded.gated_modules().values()} == {
        type(m) for m in c.gated_modules().values()}
    with torch.no_grad():
        got = loaded(pixel_values=x)
    assert type(got) is type(want) and rel_err(got.logits, want.logits) <= 1e-5
    ort = pytest.importorskip("onnxruntime")
    from ispc.backends.onnx import export_onnx
    with contextlib.redirect_stdout(io.StringIO()):
        export_onnx(c, tmp_path / "m.onnx", (x,))
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"))
    out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    assert rel_err(torch.from_numpy(out), want.logits) <= 1e-4


def test_loads_in_a_fresh_process(tmp_path):
    # the archive's output structure names a transformers ModelOutput class, which registers
    # itself with PyTorch's pytree only when its module is imported: ispc.load imports it
    import subprocess
    import sys

    c = ispc.compile(zoo.hf_model("convnext"), _data(), progress=False,
                     config=ispc.GatingConfig(keep_ratio=0.5, mode="topk", min_channels=8))
    path = ispc.save(c, tmp_path / "m.ispc")
    code = ("import sys, torch, ispc; assert 'transformers' not in sys.modules; "
            f"out = ispc.load({str(path)!r})(torch.zeros(1, 3, 32, 32)); "
            "print(type(out).__name__, tuple(out.logits.shape))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split("\n")[0] == "ImageClassifierOutputWithNoAttention (1, 10)"
