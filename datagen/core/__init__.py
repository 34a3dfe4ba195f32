"""What every layer stands on: the stage contract, files, HTTP, API keys, memory."""
