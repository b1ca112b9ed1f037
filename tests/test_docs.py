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
