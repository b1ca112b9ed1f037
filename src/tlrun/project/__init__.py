"""The project: its file ([tool.tlrun] in pyproject.toml), app discovery, and tlrun init."""
