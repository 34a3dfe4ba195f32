"""Where the review app listens by default: light, so that the CLI can use these without
loading the web stack or pyarrow."""

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
