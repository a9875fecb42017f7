"""The CLI imports only the module of the command it runs (all of umbra: a third of a second)."""

from __future__ import annotations

import subprocess
import sys

from umbra.cli.main import COMMANDS, command_in


def test_every_command_is_registered_by_name() -> None:
    from typer.main import get_command

    from umbra.cli.main import register

    group = get_command(register())
    assert set(group.commands) == {*COMMANDS, "version"}  # type: ignore[attr-defined]


def test_the_command_is_found_after_global_options() -> None:
    assert command_in(["--password-file", "backup", "list", "x"]) == "list"
    assert command_in(["--password-command=cat k", "backup", "/dev/x"]) == "backup"
    assert command_in(["--help"]) is None
    assert command_in(["bakup"]) is None  # a typo: every command is listed in the error
    assert command_in(["version"]) == "version"


def test_a_command_imports_only_its_own_module() -> None:
    probe = (
        "import sys\n"
        "from umbra.cli.main import main\n"
        "try:\n"
        "    main(['status', 'nosuchvolume', '--state', '/nonexistent'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(' '.join(sorted(m for m in sys.modules if m.startswith('umbra.'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60).stdout.split()
    assert "umbra.cli.protect" in out
    assert not {"umbra.cli.backup", "umbra.engine.backup", "umbra.cli.restore", "umbra.cli.files"} & set(out)
