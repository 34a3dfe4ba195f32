"""The style library in prompts/styles.toml: named styles with prompt and negative prompt.

Validated on load: ids are snake_case, prompts are non-empty, a reference image (if named)
exists. Unknown style ids are a configuration error naming the known ones.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from datagen.core.package_data import package_data_dir

STYLES_FILE = "styles.toml"
_STYLE_ID = re.compile(r"^[a-z][a-z0-9_]*$")


class StyleLibraryError(ValueError):
    """The style library file is malformed, or a style id is unknown."""


@dataclass(frozen=True)
class Style:
    id: str
    name: str
    prompt: str
    negative_prompt: str
    reference: Path | None = None  # an image that shows the style, if the library has one


@dataclass(frozen=True)
class StyleLibrary:
    styles: dict[str, Style]

    def get(self, style_id: str) -> Style:
        if style_id not in self.styles:
            raise StyleLibraryError(
                f"unknown style {style_id!r}; known styles: {', '.join(sorted(self.styles))}"
            )
        return self.styles[style_id]

    def select(self, style_ids: list[str] | None) -> list[Style]:
        """The named styles (all of them for None or an empty list), validated."""
        return [self.get(s) for s in style_ids] if style_ids else list(self.styles.values())

    def __len__(self) -> int:
        return len(self.styles)


def parse_style_library(text: str, base: Path) -> StyleLibrary:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise StyleLibraryError(f"{base / STYLES_FILE}: not valid TOML: {error}") from None
    default_negative = data.get("defaults", {}).get("negative_prompt", "")
    entries = data.get("styles")
    if not isinstance(entries, dict) or not entries:
        raise StyleLibraryError(f"{base / STYLES_FILE}: no [styles.<id>] tables")
    styles = {}
    for style_id, entry in entries.items():
        where = f"{base / STYLES_FILE}: style {style_id!r}"
        if not _STYLE_ID.match(style_id):
            raise StyleLibraryError(f"{where}: ids are lowercase snake_case")
        unknown = set(entry) - {"name", "prompt", "negative_prompt", "reference"}
        if unknown:
            raise StyleLibraryError(f"{where}: unknown keys {sorted(unknown)}")
        prompt = str(entry.get("prompt", "")).strip()
        if not prompt:
            raise StyleLibraryError(f"{where}: empty prompt")
        reference = None
        if entry.get("reference"):
            reference = base / "style_refs" / entry["reference"]
            if not reference.is_file():
                raise StyleLibraryError(f"{where}: reference image {reference} does not exist")
        styles[style_id] = Style(
            id=style_id,
            name=str(entry.get("name", style_id)).strip(),
            prompt=prompt,
            negative_prompt=str(entry.get("negative_prompt", default_negative)).strip(),
            reference=reference,
        )
    return StyleLibrary(styles)


@cache
def load_style_library(folder: str | None = None) -> StyleLibrary:
    """The library in `folder` (default: the shipped prompts/)."""
    base = Path(folder) if folder else package_data_dir("prompts")
    return parse_style_library((base / STYLES_FILE).read_text(encoding="utf-8"), base)
