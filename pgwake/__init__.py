"""pgwake: the command line and the one-process composition (`pgwake up`)."""
