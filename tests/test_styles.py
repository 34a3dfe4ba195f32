"""The style library: at least 20 named styles, validated on load."""

from __future__ import annotations

import pytest

from datagen.data.style_vocab import load_style_vocabulary
from datagen.data.styles import StyleLibraryError, load_style_library, parse_style_library

EXPECTED = {
    "ink_wash",
    "pixar_3d",
    "pencil_sketch",
    "voxel",
    "oil_painting",
    "anime_cel",
    "watercolor",
    "ukiyo_e",
    "pixel_art",
    "claymation",
}


def test_the_shipped_library_has_the_named_styles():
    library = load_style_library()
    assert len(library) >= 20
    assert set(library.styles) >= EXPECTED
    for style in library.styles.values():
        assert style.prompt and style.negative_prompt and style.name
        # a style prompt must read as style to the caption checker (it is what caption_sty
        # may say and caption_ns must not)
        assert load_style_vocabulary().find(style.prompt), style.id


def test_select_and_unknown_style():
    library = load_style_library()
    assert [s.id for s in library.select(["watercolor", "voxel"])] == ["watercolor", "voxel"]
    assert len(library.select(None)) == len(library)
    with pytest.raises(StyleLibraryError, match="unknown style 'nope'; known styles: "):
        library.get("nope")


@pytest.mark.parametrize(
    "text, message",
    [
        ("not toml [", "not valid TOML"),
        ("[defaults]\nnegative_prompt='x'", "no \\[styles"),
        ("[styles.Bad-Id]\nprompt='x'", "snake_case"),
        ("[styles.a]\nprompt=''", "empty prompt"),
        ("[styles.a]\nprompt='x'\ncolour='red'", "unknown keys"),
        ("[styles.a]\nprompt='x'\nreference='missing.png'", "does not exist"),
    ],
)
def test_malformed_libraries_are_refused_with_the_reason(tmp_path, text, message):
    with pytest.raises(StyleLibraryError, match=message):
        parse_style_library(text, tmp_path)
