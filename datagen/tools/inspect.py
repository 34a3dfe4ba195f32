"""`datagen inspect`: what a dataset holds, read from its index, rejects and shard footers."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.compute as pc

from datagen.data.dataset import Dataset, hidden_temporaries
from datagen.data.schema import schema_identity

SCORE_COLUMNS = ("csd_score", "dino_score")


def score_summary(values: np.ndarray) -> dict:
    """Count, missing and distribution of a float column whose nulls are NaN."""
    present = values[~np.isnan(values)]
    summary = {"count": int(present.size), "missing": int(values.size - present.size)}
    if present.size:
        quantiles = np.quantile(present, [0.0, 0.1, 0.5, 0.9, 1.0])
        summary |= {
            "min": float(quantiles[0]),
            "p10": float(quantiles[1]),
            "median": float(quantiles[2]),
            "mean": float(present.mean()),
            "p90": float(quantiles[3]),
            "max": float(quantiles[4]),
        }
    return summary


def summarize(path: str | Path) -> dict:
    """A JSON-friendly summary of the dataset at `path`."""
    dataset = Dataset(path)
    versions: Counter[str] = Counter()
    total_bytes = 0
    for shard in dataset.shards:
        file = dataset.open_shard(shard)
        name, version = schema_identity(file.schema_arrow)
        versions[f"{name} v{version}"] += 1
        total_bytes += (dataset.path / shard).stat().st_size
    index = dataset.index()
    rejects = dataset.rejects()
    summary = {
        "path": str(dataset.path),
        "split": dataset.split,
        "schema": dict(versions),
        "shards": len(dataset.shards),
        "bytes": total_bytes,
        "rows": index.num_rows,
        "unique_sample_ids": pc.count_distinct(index["sample_id"]).as_py(),
        "scores": {
            column: score_summary(index[column].to_numpy(zero_copy_only=False).astype(np.float64))
            for column in SCORE_COLUMNS
        },
        "vlm_verdict": _counts(index["vlm_verdict"].to_pylist()),
        "styles": _counts(index["style_id"].to_pylist()),
        "control_kinds": _counts(index["control_kind"].to_pylist()),
        "rejects": {
            "count": rejects.num_rows,
            "by_stage_reason": _counts(
                f"{stage}/{reason}"
                for stage, reason in zip(
                    rejects["stage"].to_pylist(), rejects["reason"].to_pylist(), strict=True
                )
            ),
        },
        "leftover_temporaries": len(hidden_temporaries(dataset.path)),
    }
    if dataset.split == "sft":
        summary["review_status"] = _counts(index["review_status"].to_pylist())
    return summary


def _counts(values) -> dict[str, int]:
    counts = Counter("null" if v is None else v for v in values)
    return dict(counts.most_common())
