"""``python -m umbra``: the same as the ``umbra`` command."""

from umbra.cli.main import main

main()
