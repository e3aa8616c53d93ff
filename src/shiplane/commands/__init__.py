"""One module per group of verbs: each returns a result the CLI renders."""
