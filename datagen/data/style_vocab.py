"""The style vocabulary: words that describe a visual style, kept in prompts/.

`caption_ns` is the content-only caption, so it must contain none of these words; the caption
stage regenerates or rejects on a hit and `datagen validate` checks every written row.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

from datagen.core.package_data import package_data_dir

VOCABULARY_FILE = "style_vocabulary.txt"


class StyleVocabulary:
    """Case-insensitive whole-word matcher for style terms (plurals included)."""

    def __init__(self, terms: list[str]):
        cleaned = sorted({t.strip().lower() for t in terms if t.strip()}, key=len, reverse=True)
        if not cleaned:
            raise ValueError("the style vocabulary is empty")
        self.terms = cleaned
        self._canonical = {_fold(t): t for t in cleaned}
        # A space or hyphen inside a term matches either, so "cel shaded" finds "cel-shaded".
        alternatives = [
            re.escape(t).replace(r"\ ", r"[\s-]+").replace(r"\-", r"[\s-]+") for t in cleaned
        ]
        self._pattern = re.compile(
            r"(?<!\w)(" + "|".join(alternatives) + r")(?:s|es)?(?!\w)", re.IGNORECASE
        )

    def find(self, text: str) -> list[str]:
        """The style terms that occur in `text`, in order of appearance."""
        return [self._canonical[_fold(m.group(1))] for m in self._pattern.finditer(text or "")]


def _fold(term: str) -> str:
    """Spaces and hyphens inside a term are interchangeable; so is case."""
    return re.sub(r"[\s-]+", " ", term.lower())


def parse_vocabulary(text: str) -> list[str]:
    return [
        line.split("#", 1)[0].strip() for line in text.splitlines() if line.split("#", 1)[0].strip()
    ]


@cache
def load_style_vocabulary(path: str | None = None) -> StyleVocabulary:
    """The vocabulary in `path`, or the one shipped in prompts/."""
    file = Path(path) if path else package_data_dir("prompts") / VOCABULARY_FILE
    return StyleVocabulary(parse_vocabulary(file.read_text(encoding="utf-8")))
