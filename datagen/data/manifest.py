"""Source manifests: a table of video URIs with their licences, spans and known metadata.

Users' source collections come as tables, not folders: a Parquet, CSV or JSONL file with one
row per source (or per clip span of a source). Columns, by name (case-insensitive; other
columns are ignored):

- `uri` (or `path`, `url`, `video`): required; a local path (relative to the manifest's
  folder) or a `file://` URI;
- `source_id`: the collection's own id of the source (default: the manifest's file name and
  row number, so it is stable while the manifest is);
- `licence` (or `license`): the source's licence, carried with every sample cut from it;
- `start_s`, `end_s` (or `start`, `end`): a span in seconds that clips must stay inside;
- `caption`: the collection's caption of the source;
- `width`, `height`, `fps`, `num_frames` (or `frames`): what is known of the video (a later
  planner can skip probing with them; planning here still probes each file).

Rows are read in batches (pyarrow's Parquet and CSV readers, JSONL line by line), so a
manifest of millions of rows is never held whole. A row that cannot be a source (no URI, a
span that ends before it starts) is returned as a `ManifestError` row, which the planner turns
into a reject (`bad_manifest_row`) naming the row; the others go on.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

MANIFEST_SUFFIXES = (".parquet", ".csv", ".jsonl")
BATCH_ROWS = 4096  # rows read at once: memory stays flat however long the manifest

# Each field and the column names that give it (the first name present wins).
COLUMNS = {
    "uri": ("uri", "path", "url", "video"),
    "source_id": ("source_id",),
    "licence": ("licence", "license"),
    "start_s": ("start_s", "start"),
    "end_s": ("end_s", "end"),
    "caption": ("caption",),
    "width": ("width",),
    "height": ("height",),
    "fps": ("fps",),
    "num_frames": ("num_frames", "frames"),
}


class ManifestFormatError(ValueError):
    """The manifest as a whole cannot be read (no URI column, not a table)."""


@dataclass(frozen=True)
class ManifestEntry:
    """One source of a manifest: where it is and what the collection says of it."""

    row: int  # 0-based row number in the manifest
    path: Path
    source_id: str
    licence: str | None = None
    start_s: float | None = None
    end_s: float | None = None
    caption: str | None = None
    width: int | None = None
    height: int | None = None
    fps: float | None = None
    num_frames: int | None = None


@dataclass(frozen=True)
class ManifestError:
    """A row that cannot be a source, and why."""

    row: int
    source_id: str
    detail: str


def is_manifest(source: str | os.PathLike) -> bool:
    return Path(source).suffix.lower() in MANIFEST_SUFFIXES and Path(source).is_file()


def manifest_problems(manifest: str | os.PathLike) -> list[str]:
    """What makes the manifest as a whole unreadable (checked before a build starts)."""
    try:
        next(iter(read_manifest(manifest)), None)
    except ManifestFormatError as error:
        return [str(error)]
    return []


def read_manifest(manifest: str | os.PathLike) -> Iterator[ManifestEntry | ManifestError]:
    """The manifest's rows in order, as entries or as the errors of rows that are not."""
    manifest = Path(manifest)
    for row, record in enumerate(_records(manifest)):
        yield _entry(manifest, row, record)


def _records(manifest: Path) -> Iterator[dict]:
    suffix = manifest.suffix.lower()
    if suffix == ".jsonl":
        yield from _jsonl(manifest)
        return
    batches = _parquet_batches(manifest) if suffix == ".parquet" else _csv_batches(manifest)
    checked = False
    for batch in batches:
        if not checked:
            _check_columns(manifest, batch.schema.names)
            checked = True
        yield from batch.to_pylist()


def _parquet_batches(manifest: Path):
    import pyarrow.parquet as pq

    try:
        file = pq.ParquetFile(manifest)
    except Exception as error:
        raise ManifestFormatError(f"{manifest}: not a readable Parquet file: {error}") from None
    _check_columns(manifest, file.schema_arrow.names)
    yield from file.iter_batches(batch_size=BATCH_ROWS)


def _csv_batches(manifest: Path):
    import pyarrow.csv as pcsv

    # every column as text: ids like 007 stay as written; numbers are parsed per field here
    try:
        names = pcsv.open_csv(manifest).schema.names
        reader = pcsv.open_csv(
            manifest,
            read_options=pcsv.ReadOptions(block_size=1 << 20),
            convert_options=pcsv.ConvertOptions(column_types=dict.fromkeys(names, "string")),
        )
    except Exception as error:
        raise ManifestFormatError(f"{manifest}: not a readable CSV file: {error}") from None
    yield from reader


def _jsonl(manifest: Path) -> Iterator[dict]:
    with manifest.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                record = {"__error__": f"line {number} is not JSON: {error.msg}"}
            if not isinstance(record, dict):
                record = {"__error__": f"line {number} is not a JSON object"}
            if number == 1 and "__error__" not in record:
                _check_columns(manifest, list(record))
            yield record


def _check_columns(manifest: Path, names: list[str]) -> None:
    lowered = {name.lower() for name in names}
    if not lowered & set(COLUMNS["uri"]):
        raise ManifestFormatError(
            f"{manifest}: no URI column (one of {', '.join(COLUMNS['uri'])}); its columns: "
            f"{', '.join(names) or 'none'}"
        )


def _entry(manifest: Path, row: int, record: dict) -> ManifestEntry | ManifestError:
    fields = {}
    lowered = {str(key).lower(): value for key, value in record.items()}
    for field, names in COLUMNS.items():
        fields[field] = next(
            (lowered[n] for n in names if n in lowered and not _missing(lowered[n])), None
        )
    source_id = str(fields["source_id"]) if fields["source_id"] is not None else None
    source_id = source_id or f"{manifest.name}#{row}"
    if "__error__" in record:
        return ManifestError(row, source_id, record["__error__"])
    if fields["uri"] is None:
        return ManifestError(row, source_id, f"row {row}: no URI")
    try:
        numbers = {
            name: _number(fields[name], name, integer=name in ("width", "height", "num_frames"))
            for name in ("start_s", "end_s", "width", "height", "fps", "num_frames")
        }
    except ValueError as error:
        return ManifestError(row, source_id, f"row {row}: {error}")
    start, end = numbers["start_s"], numbers["end_s"]
    if end is not None and end <= (start or 0.0):
        return ManifestError(
            row, source_id, f"row {row}: the span ends ({end:g} s) before it starts"
        )
    scheme = urlparse(str(fields["uri"])).scheme
    if scheme not in ("", "file"):
        return ManifestError(
            row,
            source_id,
            f"row {row}: {scheme}:// sources are not readable yet (local paths "
            "and file:// URIs are)",
        )
    licence = fields["licence"]
    return ManifestEntry(
        row=row,
        path=_local_path(manifest, str(fields["uri"])),
        source_id=source_id,
        licence=None if licence is None else str(licence),
        caption=None if fields["caption"] is None else str(fields["caption"]),
        **numbers,
    )


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or value == ""


def _number(value, name: str, integer: bool) -> float | int | None:
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} {value!r} is not a number") from None
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"{name} {value!r} is not a finite number >= 0")
    if integer:
        if number != int(number):
            raise ValueError(f"{name} {value!r} is not a whole number")
        return int(number)
    return number


def _local_path(manifest: Path, uri: str) -> Path:
    """A local path for a manifest URI: file:// URIs and paths (relative to the manifest)."""
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    path = Path(uri)
    return path if path.is_absolute() else manifest.parent / path
