"""The dataset under review: candidates from the index, decisions from the journal, media
from the shards through a row-group cache; listing filtered by status, style and scores."""

import hashlib
import math
import os
import threading
from collections import Counter, OrderedDict
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from datagen.data.dataset import Dataset, DatasetError, row_group_starts
from datagen.review.journal import (
    PENDING,
    REASON_LABELS,
    REASONS,
    BadDecision,
    Decision,
    DecisionJournal,
    ReviewError,
    UnknownSample,
    check_reviewer,
    default_reviewer,
    journal_path,
)

STATUS_FILTERS = ("all", "unreviewed", "accepted", "rejected")
DEFAULT_CACHE_BYTES = 256 * 2**20

# Media a page may request: column -> content type. style_refs is a list, served one by one.
MEDIA_TYPES = {
    "raw_video": "video/mp4",
    "stylized_video": "video/mp4",
    "raw_first_frame": "image/png",
    "stylized_first_frame": "image/png",
    "style_refs": "image/png",
}
DETAIL_COLUMNS = (
    "style_prompt",
    "caption_ns",
    "caption_sty",
    "num_frames",
    "fps",
    "height",
    "width",
    "source_uri",
    "clip_start",
    "control_kind",
    "seed",
    "vlm_detail",
)


def open_sft_dataset(sft_dir: str | os.PathLike) -> Dataset:
    """Open `sft_dir` as a dataset of SFT candidates; DatasetError / ReviewError otherwise."""
    dataset = Dataset(sft_dir)
    if dataset.split != "sft":
        raise ReviewError(
            f"{dataset.path}: holds {dataset.split} rows; review works on SFT candidates "
            "(the build-sft output, e.g. OUT/sft)"
        )
    return dataset


def sorted_index(dataset: Dataset) -> pa.Table:
    """The dataset's index in write order (shard, row); duplicate sample_ids refused."""
    index = dataset.index()
    order = pc.sort_indices(index, sort_keys=[("shard", "ascending"), ("row", "ascending")])
    index = index.take(order)
    duplicates = index.num_rows - pc.count_distinct(index["sample_id"]).as_py()
    if duplicates:
        raise ReviewError(
            f"{dataset.path}: {duplicates} duplicate sample_id(s); "
            f"run `datagen validate {dataset.path}`"
        )
    return index


class _RowGroupCache:
    """Whole row groups of the shards, least recently used first out, bounded in bytes.

    A reviewer moves through samples in write order, so reading a whole row group (bounded by
    ShardLimits.row_group_bytes) serves the next samples' videos from memory; Parquet cannot
    read one row of a column chunk anyway. One lock: the page asks for both videos at once,
    and the second request should wait for the first read instead of repeating it.
    """

    def __init__(self, dataset: Dataset, max_bytes: int):
        self.dataset = dataset
        self.max_bytes = max_bytes
        self._tables: OrderedDict[tuple[str, int], pa.Table] = OrderedDict()
        self._bytes = 0
        self._starts: dict[str, np.ndarray] = {}
        self._files: dict[str, Any] = {}
        self._lock = threading.Lock()

    def row_group(self, shard: str, row: int) -> tuple[pa.Table, int]:
        """The row group holding `row` of `shard`, and the row's position in it."""
        with self._lock:
            if shard not in self._files:
                self._files[shard] = self.dataset.open_shard(shard)
                self._starts[shard] = row_group_starts(self._files[shard])
            starts = self._starts[shard]
            group = int(np.searchsorted(starts, row, side="right")) - 1
            if not 0 <= group < len(starts) - 1:
                raise DatasetError(f"{self.dataset.path}: index points past the end of {shard}")
            key = (shard, group)
            table = self._tables.get(key)
            if table is None:
                table = self._files[shard].read_row_group(group)
                self._tables[key] = table
                self._bytes += table.nbytes
                while self._bytes > self.max_bytes and len(self._tables) > 1:
                    _, evicted = self._tables.popitem(last=False)
                    self._bytes -= evicted.nbytes
            else:
                self._tables.move_to_end(key)
            return table, row - int(starts[group])


class ReviewSession:
    """The state behind the review app: candidates (from the index), decisions (from the
    journal), media (from the shards, through a row-group cache). Thread-safe."""

    def __init__(
        self,
        sft_dir: str | os.PathLike,
        reviewer: str | None = None,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
    ):
        reviewer = reviewer if reviewer is not None else default_reviewer()
        if not reviewer:
            raise ReviewError("no reviewer name: pass --reviewer NAME (or set $USER)")
        self.reviewer = check_reviewer(reviewer)
        self.dataset = open_sft_dataset(sft_dir)
        self.path = self.dataset.path.resolve()
        index = sorted_index(self.dataset)
        self.sample_ids: list[str] = index["sample_id"].to_pylist()
        self._position = {sample_id: i for i, sample_id in enumerate(self.sample_ids)}
        self._style = index["style_id"].to_pylist()
        self._csd = index["csd_score"].to_pylist()
        self._dino = index["dino_score"].to_pylist()
        self._vlm = index["vlm_verdict"].to_pylist()
        # Rows written by build-sft say 'pending'; a dataset finalized before says 'accepted'.
        self._stored = [s or PENDING for s in index["review_status"].to_pylist()]
        self._shard = index["shard"].to_pylist()
        self._row_number = index["row"].to_pylist()
        self.styles = sorted(set(self._style))
        self.journal = DecisionJournal(journal_path(self.path))
        self._cache = _RowGroupCache(self.dataset, cache_bytes)

    # what the page lists

    def _position_of(self, sample_id: str) -> int:
        if sample_id not in self._position:
            raise UnknownSample(f"no sample {sample_id!r} in {self.path}")
        return self._position[sample_id]

    def decision_state(self, i: int) -> dict[str, Any]:
        """The effective decision of sample number `i`: the journal's latest, else the row's."""
        decision = self.journal.latest.get(self.sample_ids[i])
        if decision is not None:
            return {
                "verdict": decision.verdict,
                "reason": decision.reason,
                "note": decision.note,
                "reviewer": decision.reviewer,
                "decided_at": decision.decided_at,
                "revision": decision.revision,
                "override": decision.override,
                "source": "journal",
            }
        return {
            "verdict": self._stored[i],
            "reason": None,
            "note": None,
            "reviewer": None,
            "decided_at": None,
            "revision": 0,
            "override": False,
            "source": "shards",
        }

    def summary(self, i: int) -> dict[str, Any]:
        return {
            "sample_id": self.sample_ids[i],
            "style_id": self._style[i],
            "csd_score": _finite(self._csd[i]),
            "dino_score": _finite(self._dino[i]),
            "vlm_verdict": self._vlm[i],
            "decision": self.decision_state(i),
        }

    def samples(
        self,
        status: str = "all",
        style: str | None = None,
        csd_min: float | None = None,
        csd_max: float | None = None,
        dino_min: float | None = None,
        dino_max: float | None = None,
    ) -> list[dict[str, Any]]:
        """Sample summaries in write order that pass the filters (score bounds inclusive;
        a sample without the score fails a bound on it)."""
        if status not in STATUS_FILTERS:
            raise BadDecision(f"status must be one of {list(STATUS_FILTERS)}, got {status!r}")
        for name, low, high in (("csd", csd_min, csd_max), ("dino", dino_min, dino_max)):
            for bound in (low, high):
                if bound is not None and not math.isfinite(bound):
                    raise BadDecision(f"{name} bounds must be finite numbers")
            if low is not None and high is not None and low > high:
                raise BadDecision(f"{name} range is empty: min {low} > max {high}")
        self.journal.refresh()
        chosen = []
        for i in range(len(self.sample_ids)):
            if style and self._style[i] != style:
                continue
            if not (
                _in_range(self._csd[i], csd_min, csd_max)
                and _in_range(self._dino[i], dino_min, dino_max)
            ):
                continue
            if status != "all":
                verdict = self.decision_state(i)["verdict"]
                wanted = PENDING if status == "unreviewed" else status
                if verdict != wanted:
                    continue
            chosen.append(self.summary(i))
        return chosen

    def progress(self) -> dict[str, Any]:
        self.journal.refresh()
        verdicts = Counter()
        reasons = Counter()
        for i in range(len(self.sample_ids)):
            state = self.decision_state(i)
            verdicts[state["verdict"]] += 1
            if state["verdict"] == "rejected" and state["reason"]:
                reasons[state["reason"]] += 1
        total = len(self.sample_ids)
        return {
            "total": total,
            "reviewed": total - verdicts[PENDING],
            "accepted": verdicts["accepted"],
            "rejected": verdicts["rejected"],
            "pending": verdicts[PENDING],
            "by_reason": dict(sorted(reasons.items())),
        }

    def first_unreviewed(self) -> str | None:
        for i in range(len(self.sample_ids)):
            if self.decision_state(i)["verdict"] == PENDING:
                return self.sample_ids[i]
        return None

    def info(self) -> dict[str, Any]:
        """What the page needs once: dataset, reviewer, reason codes, styles, progress."""
        progress = self.progress()
        return {
            "dataset": str(self.path),
            "reviewer": self.reviewer,
            "reasons": [{"code": code, "label": REASON_LABELS[code]} for code in REASONS],
            "styles": self.styles,
            "status_filters": list(STATUS_FILTERS),
            "journal": str(self.journal.path),
            "first_unreviewed": self.first_unreviewed(),
            "progress": progress,
        }

    # one sample

    def detail(self, sample_id: str) -> dict[str, Any]:
        """The sample's summary plus captions, clip geometry and how many style references."""
        i = self._position_of(sample_id)
        self.journal.refresh()
        table, local = self._row(i)
        detail = {name: table.column(name)[local].as_py() for name in DETAIL_COLUMNS}
        detail["fps"] = _finite(detail["fps"])
        refs = table.column("style_refs")[local]
        detail["num_style_refs"] = len(refs) if refs.is_valid else 0
        return {**self.summary(i), **detail, "position": i, "total": len(self.sample_ids)}

    def media(self, sample_id: str, name: str, number: int | None = None) -> tuple[bytes, str]:
        """The stored bytes of one media item (`number` picks a style reference)."""
        i = self._position_of(sample_id)
        if name not in MEDIA_TYPES:
            raise UnknownSample(f"no media {name!r}; known: {sorted(MEDIA_TYPES)}")
        table, local = self._row(i)
        value = table.column(name)[local]
        if name == "style_refs":
            refs = value.as_py() or []
            if number is None or not 0 <= number < len(refs):
                raise UnknownSample(f"{sample_id} has {len(refs)} style reference(s), no {number}")
            data = refs[number]
        else:
            data = value.as_py()
        if data is None:
            raise UnknownSample(f"{sample_id} has no {name}")
        return data, MEDIA_TYPES[name]

    def media_tag(self, sample_id: str, name: str, number: int | None = None) -> str:
        """A strong ETag: shards are immutable and their names unique per writing run."""
        i = self._position_of(sample_id)
        key = f"{self._shard[i]}/{self._row_number[i]}/{sample_id}/{name}/{number}"
        return '"' + hashlib.sha256(key.encode()).hexdigest()[:32] + '"'

    def _row(self, i: int) -> tuple[pa.Table, int]:
        table, local = self._cache.row_group(self._shard[i], self._row_number[i])
        if table.column("sample_id")[local].as_py() != self.sample_ids[i]:
            raise DatasetError(
                f"{self.path}: index is stale for {self._shard[i]} row {self._row_number[i]}; "
                f"run `datagen validate {self.path}`"
            )
        return table, local

    # deciding

    def decide(
        self,
        sample_id: str,
        verdict: str,
        reason: str | None,
        note: str | None,
        base_revision: int,
        reviewer: str | None = None,
        override: bool = False,
    ) -> Decision:
        self._position_of(sample_id)
        if reviewer is None:
            reviewer = self.reviewer
        if not isinstance(base_revision, int) or isinstance(base_revision, bool):
            raise BadDecision("base_revision must be an integer")
        if base_revision < 0:
            raise BadDecision("base_revision must be >= 0")
        return self.journal.append(
            sample_id, verdict, reason, note, reviewer, base_revision, override
        )


def _finite(value: float | None) -> float | None:
    """JSON has no NaN: a stored NaN score is no score."""
    return value if value is not None and math.isfinite(value) else None


def _in_range(value: float | None, low: float | None, high: float | None) -> bool:
    if low is None and high is None:
        return True
    if value is None or not math.isfinite(value):
        return False
    return (low is None or value >= low) and (high is None or value <= high)
