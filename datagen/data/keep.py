"""The keep rule: which rows of a dataset are kept, and why each other one is dropped.

One definition for both places that apply it: the build's automatic CT filter
(datagen/build/write.py, `csd_score > csd_threshold` and, when asked, a passing VLM verdict)
and `datagen filter` (datagen/tools/filter.py). Decisions are vectorised over a pyarrow table
with the index's decision columns (DECISION_COLUMNS), so the filter decides millions of index
rows without reading a video byte, and the build decides a shard's rows the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


class FilterError(Exception):
    """The filter was asked something it must refuse (bad paths, bad thresholds)."""


@dataclass(frozen=True)
class FilterCriteria:
    """A row is kept when every given criterion holds. Scores compare strictly (`>`), as in
    the paper's `csd_score > 0.5`; a row whose needed score is null is counted as missing."""

    csd: float | None = None
    dino: float | None = None
    vlm_pass: bool = False

    def __post_init__(self) -> None:
        for name in ("csd", "dino"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and -1.0 <= value <= 1.0):
                raise FilterError(f"--{name} threshold must be in [-1, 1], got {value}")
        if self.csd is None and self.dino is None and not self.vlm_pass:
            raise FilterError("nothing to filter on: give --csd, --dino and/or --vlm-pass")

    def describe(self) -> str:
        parts = []
        if self.csd is not None:
            parts.append(f"csd_score > {self.csd:g}")
        if self.dino is not None:
            parts.append(f"dino_score > {self.dino:g}")
        if self.vlm_pass:
            parts.append("vlm_verdict == 'pass'")
        return " and ".join(parts)


# Drop reasons, in the order criteria are checked; a row's code indexes this list, -1 = kept.
REASONS = [
    "csd_missing",
    "csd_below_threshold",
    "dino_missing",
    "dino_below_threshold",
    "vlm_missing",
    "vlm_fail",
]
MISSING_CODES = [REASONS.index(r) for r in REASONS if r.endswith("_missing")]
KEPT = -1
# The columns a decision reads (all in the dataset index).
DECISION_COLUMNS = ["csd_score", "dino_score", "vlm_verdict"]


@dataclass
class Decision:
    """Per index row: KEPT, or the index in REASONS of the first criterion that failed."""

    code: np.ndarray  # int8

    @property
    def keep(self) -> np.ndarray:
        return self.code == KEPT

    def reason_counts(self) -> np.ndarray:
        """How many rows each reason dropped, indexed like REASONS."""
        return np.bincount(self.code[self.code != KEPT], minlength=len(REASONS))


def _score_values(index: pa.Table, column: str) -> np.ndarray:
    """Float64 values with nulls (and stored NaNs, which are no score either) as NaN."""
    return index[column].to_numpy(zero_copy_only=False).astype(np.float64)


def decide(index: pa.Table, criteria: FilterCriteria) -> Decision:
    """Apply `criteria` to index rows, vectorised; the first failing criterion is the reason."""
    code = np.full(index.num_rows, KEPT, dtype=np.int8)

    def mark(rows: np.ndarray, reason: str) -> None:
        code[rows & (code == KEPT)] = REASONS.index(reason)

    for column, threshold, prefix in (
        ("csd_score", criteria.csd, "csd"),
        ("dino_score", criteria.dino, "dino"),
    ):
        if threshold is not None:
            values = _score_values(index, column)
            absent = np.isnan(values)
            mark(absent, f"{prefix}_missing")
            mark(~absent & ~(values > threshold), f"{prefix}_below_threshold")
    if criteria.vlm_pass:
        verdicts = index["vlm_verdict"]
        mark(pc.is_null(verdicts).to_numpy(zero_copy_only=False), "vlm_missing")
        passed = pc.fill_null(pc.equal(verdicts, "pass"), False).to_numpy(zero_copy_only=False)
        mark(~passed, "vlm_fail")
    return Decision(code)


def drop_details(dropped: pa.Table, codes: np.ndarray, criteria: FilterCriteria) -> pa.Array:
    """Human-readable detail of each dropped index row (e.g. 'csd_score=0.4213 <= 0.5'), from
    the rows and their REASONS codes, vectorised."""
    detail = pa.nulls(dropped.num_rows, pa.string())
    for column, threshold, prefix in (
        ("csd_score", criteria.csd, "csd"),
        ("dino_score", criteria.dino, "dino"),
    ):
        if threshold is None:
            continue
        shown = pc.cast(pc.round(pc.cast(dropped[column], pa.float64()), 4), pa.string())
        below = pc.binary_join_element_wise(f"{column}=", shown, f" <= {threshold:g}", "")
        detail = pc.if_else(
            pa.array(codes == REASONS.index(f"{prefix}_below_threshold")), below, detail
        )
        detail = pc.if_else(
            pa.array(codes == REASONS.index(f"{prefix}_missing")),
            pa.scalar(f"{column} is null"),
            detail,
        )
    verdict = pc.binary_join_element_wise(
        "vlm_verdict=", pc.fill_null(dropped["vlm_verdict"], "null"), ""
    )
    detail = pc.if_else(pa.array(codes == REASONS.index("vlm_fail")), verdict, detail)
    detail = pc.if_else(
        pa.array(codes == REASONS.index("vlm_missing")), pa.scalar("vlm_verdict is null"), detail
    )
    return detail
