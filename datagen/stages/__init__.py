"""One module per step of the method: its config, input, output and Stage."""
