"""docs/SAFETY.md names, for each input it describes, the test that checks it: every one must exist."""
from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_every_test_the_safety_table_names_exists():
    named = re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", (REPO / "docs" / "SAFETY.md").read_text())
    assert len(named) >= 40
    missing = []
    for path, name in named:
        tree = ast.parse((REPO / path).read_text())
        if name not in {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}:
            missing.append(f"{path}::{name}")
    assert not missing, missing
