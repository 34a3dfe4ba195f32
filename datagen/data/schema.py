"""The one schema module: loads the versioned table definitions in `schemas/` as pyarrow schemas.

The definitions are JSON so that a training data loader can read them without datagen. Every
writer and reader goes through `table_schema(...)` and `check_schema(...)`; the schema name and
version travel in the Parquet file's metadata, each field's description in the field metadata.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pyarrow as pa

from datagen.core.package_data import package_data_dir

# The review columns of an SFT row as the build writes it: pending, nobody has looked yet.
SFT_REVIEW_PENDING = {
    "review_status": "pending",
    "review_reason": None,
    "review_note": None,
    "reviewer": None,
    "reviewed_at": None,
}

SCHEMA_NAME_KEY = b"datagen.data.schema"
SCHEMA_VERSION_KEY = b"datagen.schema_version"
DESCRIPTION_KEY = b"description"

CT_ROW = "ct_row"
SFT_ROW = "sft_row"
INDEX = "index"
REJECTS = "rejects"
ROW_SCHEMAS = {"ct": CT_ROW, "sft": SFT_ROW}

# Rows v2 add source_id and licence (a manifest's). A dataset keeps the version it was begun
# with (data/dataset/writer.py): v1 datasets stay readable, and a resumed v1 build stays v1.
CURRENT_VERSION = {CT_ROW: 2, SFT_ROW: 2, INDEX: 1, REJECTS: 1}


class SchemaError(ValueError):
    """A table or file does not match the datagen schema it claims (or claims none)."""


@dataclass(frozen=True)
class FieldSpec:
    name: str
    type: str
    nullable: bool
    description: str


# --- the small type language of schemas/*.json ---------------------------------------------

_TIMESTAMP = re.compile(r"timestamp\[(\w+)(?:,\s*(\S+))?\]$")


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not nested inside <...> or [...]."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "<[":
            depth += 1
        elif ch in ">]":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    parts.append(text[start:].strip())
    return [p for p in parts if p]


def parse_type(text: str) -> pa.DataType:
    """Parse `int32`, `list<T>`, `map<K, V>`, `struct<a: T, ...>`, `timestamp[us, UTC]`, ..."""
    text = text.strip()
    if text.startswith("list<") and text.endswith(">"):
        return pa.list_(parse_type(text[5:-1]))
    if text.startswith("map<") and text.endswith(">"):
        key, value = _split_top_level(text[4:-1])
        return pa.map_(parse_type(key), parse_type(value))
    if text.startswith("struct<") and text.endswith(">"):
        members = []
        for member in _split_top_level(text[7:-1]):
            name, _, member_type = member.partition(":")
            members.append(pa.field(name.strip(), parse_type(member_type)))
        return pa.struct(members)
    match = _TIMESTAMP.match(text)
    if match:
        return pa.timestamp(match.group(1), tz=match.group(2))
    try:
        return pa.type_for_alias(text)
    except ValueError:
        raise SchemaError(f"unknown type {text!r} in a schema definition") from None


# --- loading definitions -------------------------------------------------------------------


def _definition_path(name: str, version: int) -> Path:
    return package_data_dir("schemas") / f"{name}.v{version}.json"


def _load_fields(path: Path) -> tuple[dict, list[FieldSpec]]:
    definition = json.loads(path.read_text())
    fields: list[FieldSpec] = []
    if "extends" in definition:
        _, fields = _load_fields(path.parent / definition["extends"])
    fields = fields + [FieldSpec(**spec) for spec in definition["fields"]]
    names = [f.name for f in fields]
    duplicated = {n for n in names if names.count(n) > 1}
    if duplicated:
        raise SchemaError(f"{path.name}: fields defined twice: {sorted(duplicated)}")
    return definition, fields


@cache
def table_schema(name: str, version: int | None = None) -> pa.Schema:
    """The pyarrow schema of table `name` (ct_row, sft_row, index, rejects) at `version`."""
    if name not in CURRENT_VERSION:
        raise SchemaError(f"unknown table {name!r}; known: {sorted(CURRENT_VERSION)}")
    version = CURRENT_VERSION[name] if version is None else version
    path = _definition_path(name, version)
    if not path.exists():
        raise SchemaError(f"no definition of {name} version {version} ({path})")
    definition, fields = _load_fields(path)
    return pa.schema(
        [
            pa.field(
                f.name,
                parse_type(f.type),
                nullable=f.nullable,
                metadata={DESCRIPTION_KEY: f.description.encode()},
            )
            for f in fields
        ],
        metadata={
            SCHEMA_NAME_KEY: name.encode(),
            SCHEMA_VERSION_KEY: str(version).encode(),
            b"description": definition["description"].encode(),
        },
    )


def row_schema(split: str, version: int | None = None) -> pa.Schema:
    """The row schema of a tier: 'ct' or 'sft' (at `version`; default the current one)."""
    if split not in ROW_SCHEMAS:
        raise SchemaError(f"unknown split {split!r}; expected one of {sorted(ROW_SCHEMAS)}")
    return table_schema(ROW_SCHEMAS[split], version)


def describe(schema: pa.Schema) -> dict[str, str]:
    """Field name -> description, as stored in the schema."""
    return {f.name: (f.metadata or {}).get(DESCRIPTION_KEY, b"").decode() for f in schema}


# --- checking ------------------------------------------------------------------------------


def schema_identity(schema: pa.Schema) -> tuple[str, int] | None:
    """(name, version) a schema claims through its metadata, or None for a foreign schema."""
    metadata = schema.metadata or {}
    if SCHEMA_NAME_KEY not in metadata or SCHEMA_VERSION_KEY not in metadata:
        return None
    try:
        return metadata[SCHEMA_NAME_KEY].decode(), int(metadata[SCHEMA_VERSION_KEY])
    except ValueError:
        return None


def check_schema(actual: pa.Schema, expected_names: set[str] | str, where: str) -> str:
    """Check that `actual` is one of the datagen tables `expected_names`; return its name.

    Raises SchemaError naming `where` (a file) and the first difference found.
    """
    if isinstance(expected_names, str):
        expected_names = {expected_names}
    identity = schema_identity(actual)
    if identity is None:
        raise SchemaError(
            f"{where}: not a datagen file (no '{SCHEMA_NAME_KEY.decode()}' schema metadata); "
            f"expected one of {sorted(expected_names)}"
        )
    name, version = identity
    if name not in expected_names:
        raise SchemaError(f"{where}: holds a {name!r} table, expected {sorted(expected_names)}")
    if name not in CURRENT_VERSION or version > CURRENT_VERSION[name]:
        raise SchemaError(
            f"{where}: {name} schema version {version} is newer than this datagen "
            f"({CURRENT_VERSION.get(name)}); upgrade datagen"
        )
    expected = table_schema(name, version)
    problems = schema_differences(actual, expected)
    if problems:
        raise SchemaError(f"{where}: does not match {name} v{version}: " + "; ".join(problems))
    return name


def schema_differences(actual: pa.Schema, expected: pa.Schema) -> list[str]:
    """Human-readable differences in field names, order, types and nullability."""
    problems = []
    actual_names, expected_names = actual.names, expected.names
    missing = [n for n in expected_names if n not in actual_names]
    extra = [n for n in actual_names if n not in expected_names]
    if missing:
        problems.append(f"missing fields {missing}")
    if extra:
        problems.append(f"unexpected fields {extra}")
    for field in expected:
        if field.name not in actual_names:
            continue
        got = actual.field(field.name)
        if not got.type.equals(field.type):
            problems.append(f"field {field.name!r} is {got.type}, expected {field.type}")
        elif got.nullable and not field.nullable:
            problems.append(f"field {field.name!r} is nullable, expected non-nullable")
    if not missing and not extra and actual_names != expected_names:
        problems.append("fields are in a different order")
    return problems


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """Cast `table` to `schema` (column order, types, metadata) and enforce non-null fields.

    Raises SchemaError on missing or unexpected columns, uncastable values or nulls in a
    non-nullable field, naming the field.
    """
    missing = [n for n in schema.names if n not in table.column_names]
    extra = [n for n in table.column_names if n not in schema.names]
    if missing or extra:
        raise SchemaError(
            f"rows do not match {schema_label(schema)}: missing {missing}, unexpected {extra}"
        )
    columns = []
    for field in schema:
        column = table.column(field.name)
        if not field.nullable and column.null_count:
            raise SchemaError(
                f"field {field.name!r} is null in {column.null_count} row(s) "
                f"but {schema_label(schema)} requires a value"
            )
        if not column.type.equals(field.type):
            try:
                column = column.cast(field.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as error:
                raise SchemaError(
                    f"field {field.name!r}: cannot store {column.type} as {field.type}: {error}"
                ) from None
        columns.append(column)
    return pa.Table.from_arrays(columns, schema=schema)


def schema_label(schema: pa.Schema) -> str:
    identity = schema_identity(schema)
    return f"{identity[0]} v{identity[1]}" if identity else "a foreign schema"
