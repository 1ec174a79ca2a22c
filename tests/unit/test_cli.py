from __future__ import annotations

import click
import pytest
from click.testing import CliRunner

from airgap.cli import main


def all_commands() -> list[tuple[str, click.Command]]:
    found: list[tuple[str, click.Command]] = []

    def walk(prefix: str, command: click.Command) -> None:
        found.append((prefix, command))
        if isinstance(command, click.Group):
            for name, sub in command.commands.items():
                walk(f"{prefix} {name}".strip(), sub)

    walk("", main)
    return found


@pytest.mark.parametrize(("name", "command"), all_commands())
def test_every_command_has_help(name: str, command: click.Command) -> None:
    assert command.help and len(command.help.strip()) > 20, f"command {name!r} lacks help text"
    result = CliRunner().invoke(main, [*name.split(), "--help"])
    assert result.exit_code == 0
    assert "Usage:" in result.output
    for param in command.params:
        if isinstance(param, click.Option) and param.name not in ("help", "version"):
            assert param.help, f"option {param.opts} of {name!r} lacks help text"


def test_read_only_commands_have_json() -> None:
    commands = dict(all_commands())
    for name in ("inspect", "verify", "status"):
        assert any(p.name == "as_json" for p in commands[name].params), name


def test_error_is_one_line_and_verbose_shows_traceback(tmp_path: object) -> None:
    runner = CliRunner()
    result = runner.invoke(main, ["status", "--prefix", "/proc/1/nonexistent/x"])
    assert result.exit_code == 0  # nothing installed is not an error
    result = runner.invoke(main, ["inspect", "/nonexistent.airgap"])
    assert result.exit_code == 1
    assert result.output.strip().count("\n") == 0 and "nonexistent.airgap not found" in result.output
    verbose = runner.invoke(main, ["--verbose", "inspect", "/nonexistent.airgap"])
    assert "Traceback" in verbose.output
    after = runner.invoke(main, ["inspect", "/nonexistent.airgap"])  # --verbose is per invocation, not a global
    assert "Traceback" not in after.output and after.output.strip().count("\n") == 0
