"""A build: its settings, the list of steps, work files, row assembly and write."""
