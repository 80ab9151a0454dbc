"""The README's configuration table and command list cannot drift from the code."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

from outbox.cli import build_parser
from outbox.settings import Settings

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def test_every_setting_is_documented_with_its_default() -> None:
    defaults = Settings()
    for f in fields(Settings):
        row = next((line for line in README.splitlines()
                    if line.startswith(f"| `{f.metadata['env']}`")), None)
        assert row is not None, f"{f.metadata['env']} missing from the README"
        assert str(getattr(defaults, f.name)) in row, f"{f.metadata['env']}: default differs"


def test_every_command_is_documented() -> None:
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    for name in commands:
        assert f"`outbox {name}" in README, f"outbox {name} missing from the README"
