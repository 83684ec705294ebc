"""tokenrm.cli: the `tokenrm` command, one entry point with a subcommand per job."""
