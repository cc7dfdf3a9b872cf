"""The README stays true to the code: its config table names every GatingConfig field, its links
resolve, CI runs exactly its test command, and its "Your model" code runs."""
from __future__ import annotations

import dataclasses
import re
import sys
import types
from pathlib import Path

import pytest
import torch

import zoo
from ispc.config import GatingConfig

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def test_config_table_names_every_field():
    table = README[README.index("### GatingConfig"):README.index("## Command line")]
    named = set(re.findall(r"^\| `(\w+)`(?: / `(\w+)`)?", table, re.M))
    names = {n for pair in named for n in pair if n}
    assert names == {f.name for f in dataclasses.fields(GatingConfig)}


def test_links_and_images_resolve():
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README):
        if not target.startswith("http"):
            assert (REPO / target).exists(), target
    for doc in (REPO / "docs").glob("*.md"):
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", doc.read_text()):
            if not target.startswith("http"):
                assert (doc.parent / target).exists(), f"{doc.name}: {target}"


def test_ci_runs_the_readme_test_command():
    quick = README[README.index("## Quick start"):README.index("## Use it on your model")]
    command = re.findall(r"^(python -m pytest.*)$", quick, re.M)
    assert command == ["python -m pytest -q"]
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert ci[-1] == command[0]


def test_your_model_examples_run(monkeypatch):
    """The "Your model" section's code runs as written, in one namespace, with stand-ins for what
    cannot be installed or downloaded here: torchvision's resnet50 and timm's convnext_tiny are
    tests/zoo.py's small definitions of their blocks, the Hugging Face checkpoint a small-config
    ConvNeXt; inputs are 32x32 instead of 224x224 (seconds, not minutes), and latency-aware
    selection is off (at 32x32 no layer's gating pays: it would keep them all dense)."""
    transformers = pytest.importorskip("transformers")
    section = README[README.index("### Your model"):README.index("### GatingConfig")]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 3
    torchvision = types.ModuleType("torchvision")
    torchvision.models = types.SimpleNamespace(resnet50=lambda weights=None: zoo.FAMILIES["resnet"]())
    timm = types.ModuleType("timm")
    timm.create_model = lambda name, pretrained=False: zoo.FAMILIES["convnext"]()
    monkeypatch.setitem(sys.modules, "torchvision", torchvision)
    monkeypatch.setitem(sys.modules, "timm", timm)
    monkeypatch.setattr(transformers.AutoModelForImageClassification, "from_pretrained",
                        lambda name: zoo.hf_model("convnext"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    ns: dict = {}
    try:
        _run_blocks(blocks, ns)
    finally:
        torch.set_num_threads(threads)
    assert ns["y"].shape == (1, 10)
    assert ns["logits"].shape == (1, 10)


def _run_blocks(blocks: list[str], ns: dict) -> None:
    for code in blocks:
        small = code.replace("224", "32").replace("latency_aware=True", "latency_aware=False")
        exec(small, ns)  # noqa: S102 - the README's own code
        assert ns["fast"].report.summary["layers_gated"] >= 1, ns["fast"].report
