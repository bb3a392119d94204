"""CLI subcommands, one module each (see lmembed.cli.COMMANDS)."""
