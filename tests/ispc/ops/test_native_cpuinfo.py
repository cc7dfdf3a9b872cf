"""The one cached reader of ``/proc/cpuinfo`` (``native.cpuinfo``) and what reads it: the flags,
fields, the half-width AVX-512 rule and ``ispc.runtimes``' machine record."""
from __future__ import annotations

import pytest

from ispc import runtimes
from ispc.ops import native

ZEN4 = ("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel name\t: AMD EPYC 9R14\n"
        "flags\t\t: fpu avx2 fma avx512f avx512bw\n\nprocessor\t: 1\nvendor_id\t: AuthenticAMD\n")
ZEN3 = ZEN4.replace("avx512f avx512bw", "sse4_2").replace("9R14", "7R13")
ZEN5 = ZEN4.replace("family\t: 25", "family\t: 26")
XEON = ZEN4.replace("AuthenticAMD", "GenuineIntel").replace("family\t: 25", "family\t: 6")


def _fake(monkeypatch, text: str) -> None:
    monkeypatch.setattr(native, "cpuinfo", lambda: text)
    monkeypatch.setattr(native, "avx512_half_width", native.avx512_half_width.__wrapped__)


def test_read_once_and_cached():
    assert native.cpuinfo() is native.cpuinfo()  # the same string: read once per process
    assert isinstance(native.cpu_flags(), frozenset)


@pytest.mark.parametrize("text, half", [(ZEN4, True), (ZEN3, False), (ZEN5, False), (XEON, False),
                                        ("", False)])
def test_fields_flags_and_the_half_width_rule(monkeypatch, text, half):
    _fake(monkeypatch, text)
    assert native.avx512_half_width() is half
    if text:
        assert native.cpuinfo_field("cpu family") in ("25", "26", "6")
        assert "avx2" in native.cpu_flags() and native.cpuinfo_field("nope") is None
        assert runtimes._cpu_model() == native.cpuinfo_field("model name")
        assert runtimes.machine_info(1)["isa"]["avx512f"] is ("avx512f" in text)
    else:
        assert native.cpu_flags() == frozenset() and runtimes._cpu_model()


def test_arm_features_line(monkeypatch):
    _fake(monkeypatch, "processor\t: 0\nFeatures\t: fp asimd sve\nCPU implementer\t: 0x41\n")
    assert native.cpu_flags() == {"fp", "asimd", "sve"} and not native.avx512_half_width()
