"""The README is the user's manual: its exit-code table and configuration keys match the code."""

from __future__ import annotations

from pathlib import Path

from tlrun import config
from tlrun.errors import EXIT_CODES

ROOT = Path(__file__).resolve().parent.parent


def test_readme_exit_codes_match_errors() -> None:
    readme = (ROOT / "README.md").read_text()
    for code, text in EXIT_CODES.items():
        assert f"| {code} | {text} |" in readme


def test_env_example_documents_every_key() -> None:
    example = (ROOT / ".env.example").read_text()
    keys = [value for name, value in vars(config).items() if name.startswith("ENV_")]
    assert keys
    for key in keys:
        assert key in example, f"{key} is not documented in .env.example"


def test_reliability_tables_are_generated_from_the_tests() -> None:
    """docs/reliability.md shows the bad-input cases the tests run, and counts that match its tables."""
    import re
    import sys

    sys.path.insert(0, str(ROOT / "tests"))
    from bad_inputs import CASES, table

    doc = (ROOT / "docs" / "reliability.md").read_text()
    shown = doc.split("<!-- bad-inputs:start -->\n", 1)[1].split("<!-- bad-inputs:end -->", 1)[0]
    assert shown == table(), "run `python tests/bad_inputs.py` and paste its table into docs/reliability.md"
    faults = re.findall(r"^\| \d+c? \| .*? \| (.*?) \| .*$", doc, re.M)
    sources = "".join(path.read_text() for path in (ROOT / "tests").glob("test_*.py"))
    for cell in faults:  # every fault row names tests that exist
        for name in re.findall(r"`(?:[\w.]+::)?(test_\w+)", cell):
            assert f"def {name}(" in sources, name
    counts = doc.split("<!-- counts:start -->\n", 1)[1].split("<!-- counts:end -->", 1)[0]
    assert f"Faults tried: {len(faults)}, survived: {len(faults)}." in counts
    assert f"Bad inputs tried: {len(CASES)}," in counts and "Secrets leaked: 0." in counts
