"""`python -m datagen.cli ...`: the `datagen` command."""

import sys

from datagen.cli import app

if __name__ == "__main__":
    sys.exit(app())
