"""Where the files that ship with datagen live (schemas/, prompts/, flows/).

In a wheel they are packed under datagen/_data/; in an editable install (the usual way to work on
datagen) they are read from the repository's top-level folders.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent.parent  # datagen/


def package_data_dir(name: str) -> Path:
    """The directory of the shipped resource folder `name` (schemas, prompts, flows)."""
    for candidate in (_PACKAGE / "_data" / name, _PACKAGE.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(
        f"datagen's {name}/ folder is missing (looked in {_PACKAGE / '_data'} and "
        f"{_PACKAGE.parent}); reinstall datagen"
    )
