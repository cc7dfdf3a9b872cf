"""benchmarks/kernel_ab.py: both modes run end to end on small inputs (timings are not asserted)."""
import json

import pytest

from ispc.ops import native

pytestmark = pytest.mark.skipif(not native.available(), reason="native kernel not built here")


def test_layers_and_models_with_a_tuning_variant(tmp_path, benchmark_script):
    mod = benchmark_script("kernel_ab.py")
    libs = mod.load_variants(["-DSTREAM_BYTES=1"])  # every call streams: same values
    rows = mod.layer_rows(libs, batch_size=2, rounds=1, convs=[(16, 32, 1, 1, 16), (8, 8, 3, 1, 9)])
    # pix and co per layer, and cl for the 3x3 one
    assert [r["orient"] for r in rows] == ["pix", "co", "pix", "co", "cl"]
    assert all(r["identical"] and r["default_ms"] > 0 for r in rows)
    out = tmp_path / "ab.json"
    assert mod.main(["--variant=-DSTREAM_BYTES=1", "--models", "resnet18", "--image-size", "32",
                     "--batch-size", "2", "--rounds", "1", "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())["results"]
    assert row["model"] == "resnet18" and row["identical"] and row["-DSTREAM_BYTES=1_ms"] > 0


def test_variants_that_change_register_blocks_are_refused(benchmark_script):
    if native._load().ispc_block_lanes(native.ORIENT_PIX) != 32:
        pytest.skip("this CPU already builds the AVX2 blocks: -mno-avx512f changes nothing")
    with pytest.raises(SystemExit, match="register blocks"):
        benchmark_script("kernel_ab.py").load_variants(["-mno-avx512f"])


def test_channel_lane_rows_may_differ(benchmark_script):
    """-DCO_MR changes only the channel-lane kernels' position rows, not the packed weights: the
    variant loads, and its layers equal the default build's (each sum runs in the same order)."""
    mod = benchmark_script("kernel_ab.py")
    libs = mod.load_variants(["-DCO_MR=14"])
    assert libs["-DCO_MR=14"].ispc_block_rows(native.ORIENT_CO) == 14
    rows = mod.layer_rows(libs, batch_size=2, rounds=1, convs=[(24, 40, 1, 1, 7), (16, 16, 3, 1, 9)])
    assert len(rows) == 5 and all(r["identical"] and r["-DCO_MR=14_ms"] > 0 for r in rows)


def test_saved_archives(tmp_path, benchmark_script):
    """--saved: an archive (its batch from '-bN-' in the name) under each build, with paired
    ratios; 'dense' is the default build again."""
    import torch

    import ispc
    from ispc.examples.models import create_model

    torch.manual_seed(0)
    model = create_model("resnet18").eval()
    calib = [torch.randn(4, 3, 32, 32) for _ in range(2)]
    cfg = ispc.GatingConfig(keep_ratio=0.5, mode="topk", latency_aware=False)
    path = ispc.save(ispc.compile(model, calib, config=cfg, progress=False),
                     tmp_path / "resnet18-b2-k0.5.ispc")
    mod = benchmark_script("kernel_ab.py")
    out = tmp_path / "ab.json"
    assert mod.main(["--variant=-DSTREAM_BYTES=1", "--saved", str(path), "--image-size", "32",
                     "--rounds", "2", "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())["results"]
    assert row["identical"] and row["-DSTREAM_BYTES=1_paired"] > 0 and row["dense_paired"] > 0


def test_saved_archives_run_each_build(tmp_path, benchmark_script, monkeypatch):
    """A native program binds its library when it plans its first input: each build's call is an
    archive loaded and first called under that build, so the variants do not all run the default."""
    import torch

    import ispc
    from ispc.examples.models import create_model

    torch.manual_seed(0)
    model = create_model("resnet18").eval()
    calib = [torch.randn(2, 3, 32, 32) for _ in range(2)]
    cfg = ispc.GatingConfig(keep_ratio=0.5, mode="topk", latency_aware=False)
    path = ispc.save(ispc.compile(model, calib, config=cfg, progress=False),
                     tmp_path / "resnet18-b1-k0.5.ispc")
    mod = benchmark_script("kernel_ab.py")
    libs = mod.load_variants(["-DSTREAM_BYTES=1"])
    bound = []
    run_ops_lib = native._run_ops_lib
    monkeypatch.setattr(native, "_run_ops_lib", lambda: bound.append(native._lib) or run_ops_lib())
    calls = mod._loaded_per_build(libs, str(path), torch.randn(1, 3, 32, 32))
    for name, lib in libs.items():
        bound.clear()
        mod._with(lib, calls[name])
        assert bound and all(b is lib for b in bound), name
