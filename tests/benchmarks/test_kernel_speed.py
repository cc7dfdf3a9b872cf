"""benchmarks/kernel_speed.py runs and reports every op it times (timings themselves are not asserted)."""
import pytest

@pytest.fixture
def native_script(benchmark_script):
    """The script as a module, where the native kernel builds (its tables need it)."""
    from ispc.ops import native

    if not native.available():
        pytest.skip(f"native kernel not built here: {native.unavailable_reason()}")
    return benchmark_script("kernel_speed.py")


def test_kernel_speed_prints_a_row_per_op(capsys, benchmark_script):
    mod = benchmark_script("kernel_speed.py")
    assert mod.main(["--rounds", "1"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| max-pool") or line.startswith("| im2col")]
    assert len(rows) == len(mod.POOLS) + len(mod.IM2COL)
    assert all(float(r.split("|")[5]) > 0 for r in rows)  # a positive speed-up ratio on every row


def test_native_table_has_every_strategy_per_layer(native_script, capsys, monkeypatch):
    mod = native_script
    monkeypatch.setattr(mod, "CONVS", [(16, 8, 3, 1, 10), (32, 16, 1, 2, 9)])  # small, fast
    assert mod.main(["--native", "--rounds", "1", "--batch-size", "2"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if "->" in line]
    assert len(rows) == 2
    assert all(cell.count("x)") == 1 for r in rows for cell in r.split("|")[4:8])


def test_gather_table_has_both_selection_paths_per_layer(native_script, capsys, monkeypatch):
    mod = native_script
    monkeypatch.setattr(mod, "GATHER_CONVS", [(16, 8, 3, 10), (32, 16, 1, 9)])  # small, fast
    assert mod.main(["--gather", "--rounds", "1"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if "->" in line]
    assert len(rows) == 2
    assert all(cell.count("x)") == 1 for r in rows for cell in r.split("|")[4:6])
