"""Report: the table, Markdown and JSON views carry the same data."""
from __future__ import annotations

import json

from ispc.report import LayerReport, Report


def _report() -> Report:
    rows = [LayerReport(name="conv1", op="conv2d", in_channels=3, out_channels=16, macs=1000,
                        expected_macs=1000.0, reason="too few input channels"),
            LayerReport(name="layer1.conv", op="conv2d", in_channels=16, out_channels=16, macs=4000,
                        expected_macs=2000.0, cv=0.4, rank=1, gated=True, threshold=0.25,
                        kept_mean=8.0, kept_p10=6.0, kept_p90=10.0, kernel=(3, 3), stride=(1, 1))]
    return Report(layers=rows, summary={"dense_macs": 5000, "expected_macs": 3000,
                                        "mac_reduction": 0.4, "layers_gated": 1, "layers_total": 2,
                                        "mode": "threshold", "keep_ratio": 0.5},
                  notes=["a note"])


def test_table_json_and_markdown_agree():
    r = _report()
    d = json.loads(r.to_json())
    assert [row["name"] for row in d["layers"]] == ["conv1", "layer1.conv"]
    assert d["layers"][1]["gated"] is True and d["layers"][1]["cv"] == 0.4
    assert d["layers"][1]["kept_fraction"] == 0.5
    assert d["summary"]["dense_macs"] == 5000 and d["summary"]["expected_macs"] == 3000
    table = str(r)
    md = r.to_markdown()
    for text in (table, md):
        assert "layer1.conv" in text and "too few input channels" in text and "a note" in text
        assert "8.0 (50%)" in text
    assert md.startswith("# ispc report") and "|" in md


def test_round_trip_from_json():
    r = _report()
    back = Report.from_json(r.to_json())
    assert back.to_dict() == r.to_dict()
    assert back.layer("layer1.conv").kernel == (3, 3)
    assert [x.name for x in back.gated_layers] == ["layer1.conv"]
