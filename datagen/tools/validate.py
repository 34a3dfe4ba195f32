"""`datagen validate`: check the schema and the pair invariants of every row of a dataset.

Pair invariants (shared/ARCHITECTURE.md): both videos decode with the same frame count, fps and
size as the row says; both branches were animated under the same control hash, seed and prompt;
caption_ns holds no style word and caption_sty is not empty; sample_id is unique across shards;
the row records the models and parameters that produced it. Plus the store's own consistency:
the index matches the shards and no foreign file hides among them.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from datagen.data.dataset import Dataset, DatasetError, hidden_temporaries, read_index
from datagen.data.schema import SchemaError
from datagen.data.style_vocab import StyleVocabulary, load_style_vocabulary

REVIEW_STATUSES = {"pending", "accepted", "rejected"}
VLM_VERDICTS = {"pass", "fail"}
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
FPS_TOLERANCE = 0.01


@dataclass(frozen=True)
class Violation:
    shard: str
    row: int | None  # None: the whole shard or dataset
    sample_id: str | None
    rule: str
    detail: str

    def __str__(self) -> str:
        where = self.shard if self.row is None else f"{self.shard} row {self.row}"
        who = f" [{self.sample_id}]" if self.sample_id else ""
        return f"{where}{who}: {self.rule}: {self.detail}"


@dataclass
class ValidationReport:
    path: str
    shards: int = 0
    rows: int = 0
    violations: list[Violation] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations


def validate_dataset(
    path: str | Path,
    decode_videos: bool = True,
    vocabulary: StyleVocabulary | None = None,
    on_rows: Callable[[int], None] | None = None,
) -> ValidationReport:
    """Check every shard and row of the dataset at `path`; never raises on bad rows."""
    dataset = Dataset(path)
    vocabulary = vocabulary or load_style_vocabulary()
    report = ValidationReport(path=str(path), shards=len(dataset.shards))
    for leftover in hidden_temporaries(dataset.path):
        report.warnings.append(f"leftover temporary file of an interrupted writer: {leftover}")

    try:
        index = read_index(dataset.path, rebuild_missing=False)
    except (SchemaError, DatasetError) as error:
        report.violations.append(Violation("_index", None, None, "index", str(error)))
        index = None

    seen: dict[str, str] = {}
    for shard in dataset.shards:
        try:
            file = dataset.open_shard(shard)
        except (SchemaError, DatasetError) as error:
            report.violations.append(Violation(shard, None, None, "schema", str(error)))
            continue
        shard_ids: list[str] = []
        row_number = 0
        for group in range(file.num_row_groups):
            table = file.read_row_group(group)
            for row in table.to_pylist():
                sample_id = row["sample_id"]
                shard_ids.append(sample_id)
                if sample_id in seen:
                    report.violations.append(
                        Violation(
                            shard,
                            row_number,
                            sample_id,
                            "unique_sample_id",
                            f"also in {seen[sample_id]}",
                        )
                    )
                else:
                    seen[sample_id] = f"{shard} row {row_number}"
                for rule, detail in check_row(row, dataset.split, vocabulary, decode_videos):
                    report.violations.append(Violation(shard, row_number, sample_id, rule, detail))
                row_number += 1
            report.rows += table.num_rows
            if on_rows:
                on_rows(table.num_rows)
        if index is not None:
            _check_index_of_shard(index, shard, shard_ids, report)
    if index is not None:
        orphans = set(index["shard"].to_pylist()) - set(dataset.shards)
        for orphan in sorted(orphans):
            report.warnings.append(f"index entries for a shard that was never committed: {orphan}")
    return report


def _check_index_of_shard(
    index: pa.Table, shard: str, shard_ids: list[str], report: ValidationReport
) -> None:
    entries = index.filter(pc.equal(index["shard"], shard))
    if entries.num_rows == 0:
        report.violations.append(
            Violation(shard, None, None, "index", "shard has no index entries")
        )
        return
    entries = entries.sort_by("row")
    rows = entries["row"].to_pylist()
    ids = entries["sample_id"].to_pylist()
    if rows != list(range(len(shard_ids))) or ids != shard_ids:
        report.violations.append(
            Violation(
                shard,
                None,
                None,
                "index",
                f"index lists {len(ids)} rows that do not match the shard's {len(shard_ids)} rows",
            )
        )


def check_row(
    row: dict, split: str, vocabulary: StyleVocabulary, decode_videos: bool = True
) -> list[tuple[str, str]]:
    """The (rule, detail) pairs a row violates; empty when the row is valid."""
    from datagen.data.video import VideoError, decode_mp4, decode_png, probe_mp4

    problems: list[tuple[str, str]] = []
    if row["split"] != split:
        problems.append(("split", f"row says {row['split']!r} in a {split} dataset"))
    for name in ("num_frames", "height", "width"):
        if row[name] <= 0:
            problems.append(("geometry", f"{name} is {row[name]}"))
    if not (row["fps"] > 0 and math.isfinite(row["fps"])):
        problems.append(("geometry", f"fps is {row['fps']}"))

    # both videos decode, with the row's frame count, fps and size
    for branch in ("raw_video", "stylized_video"):
        try:
            if decode_videos:
                frames, info = decode_mp4(row[branch])
            else:
                info = probe_mp4(row[branch])
        except VideoError as error:
            problems.append(("video_decodes", f"{branch}: {error.detail}"))
            continue
        got = (info.num_frames, info.height, info.width)
        want = (row["num_frames"], row["height"], row["width"])
        if got != want:
            problems.append(
                (
                    "video_geometry",
                    f"{branch} is {got[0]} frames {got[2]}x{got[1]}, "
                    f"row says {want[0]} frames {want[2]}x{want[1]}",
                )
            )
        if abs(info.fps - row["fps"]) > FPS_TOLERANCE:
            problems.append(
                ("video_fps", f"{branch} plays at {info.fps:g} fps, row says {row['fps']:g}")
            )
    if row["raw_video"] == row["stylized_video"]:
        problems.append(("pair_differs", "raw and stylized videos are byte-identical"))

    # conditioning images and style references
    images = [
        ("raw_first_frame", row["raw_first_frame"]),
        ("stylized_first_frame", row["stylized_first_frame"]),
    ]
    if not row["style_refs"]:
        problems.append(("style_refs", "no style reference images"))
    images += [(f"style_refs[{i}]", ref) for i, ref in enumerate(row["style_refs"] or [])]
    for name, data in images:
        try:
            image = decode_png(data)
        except Exception as error:  # PIL raises several types for broken PNGs
            problems.append(("image_decodes", f"{name}: {error}"))
            continue
        if name.endswith("first_frame") and image.shape[:2] != (row["height"], row["width"]):
            problems.append(
                (
                    "image_geometry",
                    f"{name} is {image.shape[1]}x{image.shape[0]}, "
                    f"row says {row['width']}x{row['height']}",
                )
            )

    # captions
    if not (row["caption_sty"] or "").strip():
        problems.append(("caption_sty", "empty"))
    if not (row["caption_ns"] or "").strip():
        problems.append(("caption_ns", "empty"))
    style_words = vocabulary.find(row["caption_ns"])
    if style_words:
        problems.append(
            (
                "caption_ns_style_words",
                f"content-only caption names style words {sorted(set(style_words))}",
            )
        )

    # scores
    for name in ("csd_score", "dino_score"):
        value = row[name]
        if value is not None and not (math.isfinite(value) and -1.0 <= value <= 1.0):
            problems.append(("score_range", f"{name}={value} is outside [-1, 1]"))
    if row["vlm_verdict"] is not None and row["vlm_verdict"] not in VLM_VERDICTS:
        problems.append(
            ("vlm_verdict", f"{row['vlm_verdict']!r} is not one of {sorted(VLM_VERDICTS)}")
        )
    if split == "sft" and row.get("review_status") not in REVIEW_STATUSES:
        problems.append(
            (
                "review_status",
                f"{row.get('review_status')!r} is not one of {sorted(REVIEW_STATUSES)}",
            )
        )

    # same control, seed and prompt for both branches; provenance recorded
    if not _SHA256.match(row["control_sha256"] or ""):
        problems.append(("control_sha256", f"{row['control_sha256']!r} is not a sha256 hex"))
    problems += _check_provenance(row)
    return problems


def _check_provenance(row: dict) -> list[tuple[str, str]]:
    problems = []
    models = row["models"] or []
    if not models:
        problems.append(("models", "no models recorded"))
    for stage, model in models:
        if not (model and model.get("id") and model.get("revision")):
            problems.append(("models", f"stage {stage!r} lacks a model id or revision"))
    try:
        params = json.loads(row["params"])
    except (TypeError, json.JSONDecodeError) as error:
        return problems + [("params", f"not JSON: {error}")]
    if not isinstance(params, dict):
        return problems + [("params", "not a JSON object")]
    animate = params.get("animate")
    if not isinstance(animate, dict) or not all(
        isinstance(animate.get(b), dict) for b in ("raw", "stylized")
    ):
        return problems + [("same_conditions", "params.animate lacks 'raw' and 'stylized' records")]
    raw, stylized = animate["raw"], animate["stylized"]
    for key in ("control_sha256", "seed", "prompt"):
        if key not in raw or key not in stylized:
            problems.append(("same_conditions", f"params.animate.*.{key} is not recorded"))
        elif raw[key] != stylized[key]:
            problems.append(
                (
                    "same_conditions",
                    f"raw and stylized differ in {key}: {raw[key]!r} != {stylized[key]!r}",
                )
            )
    if raw.get("control_sha256") not in (None, row["control_sha256"]):
        problems.append(
            (
                "same_conditions",
                "params.animate control_sha256 differs from the row's control_sha256",
            )
        )
    if raw.get("seed") not in (None, row["seed"]):
        problems.append(("same_conditions", "params.animate seed differs from the row's seed"))
    return problems
