"""The schema module: definitions, round trips and clear mismatch errors."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from datagen.core.package_data import package_data_dir
from datagen.data import schema
from datagen.data.schema import SchemaError, check_schema, conform, table_schema
from datagen.data.synthetic import make_row

REQUIRED_ROW_FIELDS = [
    "sample_id",
    "split",
    "source_uri",
    "clip_start",
    "num_frames",
    "fps",
    "height",
    "width",
    "style_id",
    "style_prompt",
    "style_refs",
    "raw_first_frame",
    "stylized_first_frame",
    "raw_video",
    "stylized_video",
    "control_kind",
    "control_sha256",
    "caption_ns",
    "caption_sty",
    "csd_score",
    "dino_score",
    "vlm_verdict",
    "seed",
    "models",
    "params",
    "created_at",
    "datagen_version",
]


def test_parse_type_covers_the_type_language():
    assert schema.parse_type("list<binary>") == pa.list_(pa.binary())
    assert schema.parse_type("timestamp[us, UTC]") == pa.timestamp("us", tz="UTC")
    assert schema.parse_type("map<string, struct<id: string, revision: string>>") == pa.map_(
        pa.string(), pa.struct([("id", pa.string()), ("revision", pa.string())])
    )
    with pytest.raises(SchemaError, match="unknown type"):
        schema.parse_type("tensor<float>")


def test_ct_row_has_every_field_the_product_needs_with_descriptions():
    ct = table_schema("ct_row")
    assert set(REQUIRED_ROW_FIELDS) <= set(ct.names)
    assert ct.field("csd_score").type == pa.float32() and ct.field("csd_score").nullable
    assert ct.field("dino_score").type == pa.float32() and ct.field("dino_score").nullable
    assert ct.field("vlm_verdict").nullable
    assert not ct.field("sample_id").nullable
    assert ct.field("style_refs").type == pa.list_(pa.binary())
    descriptions = schema.describe(ct)
    assert all(descriptions[name] for name in ct.names), "every field is documented"
    assert schema.schema_identity(ct) == ("ct_row", 2)
    assert not ct.field("source_id").nullable and ct.field("licence").nullable  # new in v2
    v1 = table_schema("ct_row", 1)
    assert set(ct.names) - set(v1.names) == {"source_id", "licence"}


def test_sft_row_is_ct_plus_review_fields():
    ct, sft = table_schema("ct_row"), table_schema("sft_row")
    assert sft.names[: len(ct.names)] == ct.names
    assert set(sft.names) - set(ct.names) == {
        "review_status",
        "review_reason",
        "review_note",
        "reviewer",
        "reviewed_at",
    }


def test_every_definition_file_loads_and_documents_its_fields():
    for path in sorted(package_data_dir("schemas").glob("*.json")):
        definition = json.loads(path.read_text())
        loaded = table_schema(definition["name"], definition["version"])
        assert all(schema.describe(loaded).values()), path.name


def test_round_trip_through_parquet_keeps_schema_and_values(tmp_path):
    row = make_row(7)
    table = conform(
        pa.Table.from_pylist([row], schema=table_schema("ct_row")), table_schema("ct_row")
    )
    pq.write_table(table, tmp_path / "x.parquet")
    back = pq.read_table(tmp_path / "x.parquet")
    assert check_schema(back.schema, "ct_row", "x.parquet") == "ct_row"
    got = back.to_pylist()[0]
    assert got["raw_video"] == row["raw_video"]
    assert got["style_refs"] == row["style_refs"]
    assert got["models"] == row["models"]
    assert got["csd_score"] == pytest.approx(row["csd_score"], rel=1e-6)
    assert schema.describe(back.schema)["csd_score"].startswith("CSD style similarity")


def test_foreign_file_is_refused_by_name(tmp_path):
    pq.write_table(pa.table({"a": [1, 2]}), tmp_path / "foreign.parquet")
    foreign = pq.read_schema(tmp_path / "foreign.parquet")
    with pytest.raises(SchemaError, match=r"foreign\.parquet: not a datagen file"):
        check_schema(foreign, "ct_row", str(tmp_path / "foreign.parquet"))


def test_mismatched_type_missing_field_and_newer_version_are_named():
    ct = table_schema("ct_row")
    wrong_type = ct.set(ct.get_field_index("csd_score"), pa.field("csd_score", pa.float64()))
    with pytest.raises(SchemaError, match=r"'csd_score' is double, expected float"):
        check_schema(wrong_type, "ct_row", "f.parquet")
    missing = ct.remove(ct.get_field_index("caption_ns"))
    with pytest.raises(SchemaError, match=r"missing fields \['caption_ns'\]"):
        check_schema(missing, "ct_row", "f.parquet")
    newer = ct.with_metadata({**ct.metadata, b"datagen.schema_version": b"9"})
    with pytest.raises(SchemaError, match="newer than this datagen"):
        check_schema(newer, "ct_row", "f.parquet")
    with pytest.raises(SchemaError, match="holds a 'ct_row' table, expected"):
        check_schema(ct, "index", "f.parquet")


def test_conform_names_nulls_in_required_fields_and_missing_columns():
    row = make_row(1)
    row["caption_sty"] = None
    nullable = pa.schema([f.with_nullable(True) for f in table_schema("ct_row")])
    with pytest.raises(SchemaError, match=r"'caption_sty' is null in 1 row"):
        conform(pa.Table.from_pylist([row], schema=nullable), table_schema("ct_row"))
    with pytest.raises(SchemaError, match=r"missing \['seed'\]"):
        conform(
            pa.table(
                {k: [v] for k, v in make_row(1).items() if k not in ("seed", "models")}
                | {
                    "models": pa.array(
                        [make_row(1)["models"]], table_schema("ct_row").field("models").type
                    )
                }
            ),
            table_schema("ct_row"),
        )


def test_a_v1_dataset_stays_readable_stays_v1_when_appended_to_and_filters_to_v1(tmp_path):
    from datagen.data.dataset import Dataset, ShardWriter
    from datagen.data.keep import FilterCriteria
    from datagen.tools.filter import filter_dataset
    from datagen.tools.inspect import summarize

    old = [make_row(i) for i in range(4)]
    for row in old:
        del row["source_id"], row["licence"]
    with ShardWriter(tmp_path / "v1", "ct", version=1) as writer:
        writer.write(old[:2])
    with ShardWriter(tmp_path / "v1", "ct") as writer:  # a resumed build of today's datagen
        writer.write([make_row(i) for i in range(2, 4)])  # v2 rows: written without the new
    dataset = Dataset(tmp_path / "v1")
    assert dataset.row_version == 1 and "source_id" not in dataset.schema.names
    assert len(dataset.index()) == 4
    assert summarize(tmp_path / "v1")["schema"] == {"ct_row v1": 2}
    filter_dataset(tmp_path / "v1", tmp_path / "kept", FilterCriteria(csd=-1.0))
    assert Dataset(tmp_path / "kept").row_version == 1

    with ShardWriter(tmp_path / "v2", "ct") as writer:
        writer.write([make_row(7)])
    assert Dataset(tmp_path / "v2").row_version == 2
    assert summarize(tmp_path / "v2")["schema"] == {"ct_row v2": 1}
