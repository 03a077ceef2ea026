"""docs/security.md names, for every promise, the test that proves it: each of those tests exists.

A renamed or deleted test would leave the statement pointing at nothing; this keeps the
operator's table and the suite in step. `file::name` names a test; `::name` after it names
another test in the same file.
"""
import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STATEMENT = ROOT / "docs" / "security.md"
REFERENCE = re.compile(r"`(tests/[\w/]+\.py)?::(\w+)`")


def _tests_in(path: Path) -> set:
    tree = ast.parse(path.read_text())
    return {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")}


def test_every_named_test_exists():
    current, named, missing = None, 0, []
    for match in REFERENCE.finditer(STATEMENT.read_text()):
        current = match.group(1) or current
        assert current, f"::{match.group(2)} names no file"
        named += 1
        if match.group(2) not in _tests_in(ROOT / current):
            missing.append(f"{current}::{match.group(2)}")
    assert not missing, missing
    assert named >= 60


def test_the_readme_links_the_statement():
    assert "(docs/security.md)" in (ROOT / "README.md").read_text()
