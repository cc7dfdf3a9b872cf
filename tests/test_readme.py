"""The README stays true to the code: its config table names every GatingConfig field, its links
resolve, and CI runs exactly its test command."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

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
