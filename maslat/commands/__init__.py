"""One module per ``maslat`` command (see ``maslat.cli.COMMANDS``)."""
