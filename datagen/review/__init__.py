"""Human review of SFT candidates: a local web app, its decision journal, and `finalize`.

`datagen review SFT_DIR` serves the pending candidates of a build-sft dataset to a browser
(`datagen/review/static/`): raw and stylized videos side by side, the style references, both
captions and the scores, and accept / reject-with-a-reason decisions made from the keyboard.

Decisions are data. Each one is appended as a JSON line to `SFT_DIR/_review/decisions.jsonl`
and fsynced before the browser hears "saved", so a crash or a closed tab loses nothing; the
shards themselves are never modified. A decision names the revision of the sample it was based
on (how many decisions the sample had when the page showed it); a decision based on a stale
revision is refused (HTTP 409) so that two reviewers, or two tabs, never overwrite each other
silently - the page shows the other decision and lets the reviewer override it on purpose. An
exclusive file lock around read-check-append makes this hold across processes too (two
`datagen review` servers over one dataset).

`datagen review finalize SFT_DIR OUT` writes the accepted rows, with their review fields, as a
new SFT dataset through the ShardWriter, and the rejected ones as rejects (stage "review",
reason = the reviewer's reason code). OUT appears complete or not at all.
"""

import contextlib
import fcntl
import getpass
import hashlib
import json
import math
import os
import shlex
import shutil
import socket
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from datagen.data.dataset import (
    Dataset,
    DatasetError,
    RejectsWriter,
    ShardLimits,
    ShardWriter,
    now_utc,
    row_group_starts,
)

# No `from __future__ import annotations` here: FastAPI reads the endpoints' annotations
# (Request, the body model) at runtime, and those are imported inside create_app.
if TYPE_CHECKING:  # only for annotations: the web stack is imported when the app is built
    from fastapi import FastAPI

# Reason codes of a rejection (schemas/sft_row.v1.json, review_reason); the page maps keys 1-6
# to them in this order.
REASONS = (
    "content_mismatch",
    "motion_mismatch",
    "weak_style",
    "artifacts",
    "caption_wrong",
    "other",
)
REASON_LABELS = {
    "content_mismatch": "content differs between raw and stylized",
    "motion_mismatch": "motion differs between raw and stylized",
    "weak_style": "style too weak or wrong",
    "artifacts": "visual artifacts",
    "caption_wrong": "a caption is wrong",
    "other": "other (explain in the note)",
}
VERDICTS = ("accepted", "rejected")
PENDING = "pending"
STATUS_FILTERS = ("all", "unreviewed", "accepted", "rejected")

REVIEW_DIR = "_review"
JOURNAL_NAME = "decisions.jsonl"
JOURNAL_FORMAT = 1
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
DEFAULT_CACHE_BYTES = 256 * 2**20
MAX_NOTE_CHARS = 2000
MAX_REVIEWER_CHARS = 100
STATIC_DIR = Path(__file__).resolve().parent / "static"

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
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


class ReviewError(Exception):
    """A review request that must be refused: not an SFT dataset, bad OUT, corrupt journal."""


class BadDecision(ReviewError):
    """A decision with a bad verdict, reason, note or reviewer (HTTP 400)."""


class UnknownSample(ReviewError):
    """A sample_id (or media item) the dataset does not hold (HTTP 404)."""


class DecisionConflict(ReviewError):
    """The sample was decided again since the reviewer's page loaded it (HTTP 409)."""

    def __init__(self, sample_id: str, current: "Decision | None", base_revision: int):
        self.sample_id = sample_id
        self.current = current
        self.revision = current.revision if current else 0
        self.base_revision = base_revision
        who = f"{current.verdict} by {current.reviewer} at {current.decided_at}" if current else ""
        super().__init__(
            f"{sample_id} changed since your page loaded it (revision {base_revision}, now "
            f"{self.revision}{': ' + who if who else ''}); reload it, or override on purpose"
        )


# --- decisions and their journal -----------------------------------------------------------


@dataclass(frozen=True)
class Decision:
    """One reviewer decision, as stored in one line of the journal."""

    sample_id: str
    verdict: str  # "accepted" or "rejected"
    reason: str | None  # a REASONS code for a rejection, None for an acceptance
    note: str | None
    reviewer: str
    decided_at: str  # ISO 8601, UTC
    revision: int  # 1 for the sample's first decision, +1 for each later one
    base_revision: int  # the revision the reviewer's page showed when deciding
    override: bool = False  # the reviewer saw a conflicting decision and replaced it on purpose

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_line(self) -> bytes:
        record = {"format": JOURNAL_FORMAT, **self.as_dict()}
        return (json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n").encode()

    @classmethod
    def from_line(cls, line: bytes) -> "Decision":
        record = json.loads(line)
        if not isinstance(record, dict):
            raise ValueError("not a JSON object")
        if record.pop("format", None) != JOURNAL_FORMAT:
            raise ValueError(f"not a format {JOURNAL_FORMAT} decision record")
        decision = cls(**record)
        check_decision(decision.verdict, decision.reason, decision.note)
        check_reviewer(decision.reviewer)
        if not (isinstance(decision.revision, int) and decision.revision >= 1):
            raise ValueError(f"bad revision {decision.revision!r}")
        if not isinstance(decision.base_revision, int):
            raise ValueError(f"bad base_revision {decision.base_revision!r}")
        decision.decided_at_datetime  # noqa: B018 - raises ValueError when malformed
        return decision

    @property
    def decided_at_datetime(self) -> datetime:
        return datetime.fromisoformat(self.decided_at).astimezone(UTC)


def check_decision(verdict: Any, reason: Any, note: Any) -> None:
    """Raise BadDecision unless (verdict, reason, note) is a valid decision."""
    if verdict not in VERDICTS:
        raise BadDecision(f"verdict must be one of {list(VERDICTS)}, got {verdict!r}")
    if note is not None and not isinstance(note, str):
        raise BadDecision("note must be text")
    if note is not None and len(note) > MAX_NOTE_CHARS:
        raise BadDecision(f"note is longer than {MAX_NOTE_CHARS} characters")
    if verdict == "accepted":
        if reason is not None:
            raise BadDecision(f"an acceptance takes no reason, got {reason!r}")
        return
    if reason not in REASONS:
        raise BadDecision(f"a rejection needs a reason, one of {list(REASONS)}; got {reason!r}")
    if reason == "other" and not (note or "").strip():
        raise BadDecision("reason 'other' needs a note saying what is wrong")


def check_reviewer(reviewer: Any) -> str:
    """The reviewer name, stripped; BadDecision if empty, too long or not printable."""
    if not isinstance(reviewer, str) or not reviewer.strip():
        raise BadDecision("reviewer name is empty")
    reviewer = reviewer.strip()
    if len(reviewer) > MAX_REVIEWER_CHARS or not reviewer.isprintable():
        raise BadDecision(
            f"reviewer name must be printable and at most {MAX_REVIEWER_CHARS} characters"
        )
    return reviewer


def default_reviewer() -> str | None:
    """$USER (or the login name) when --reviewer is not given."""
    with contextlib.suppress(Exception):  # getpass raises several types when nothing is set
        return os.environ.get("USER") or getpass.getuser()
    return None


def journal_path(sft_dir: str | os.PathLike) -> Path:
    return Path(sft_dir) / REVIEW_DIR / JOURNAL_NAME


class DecisionJournal:
    """The append-only JSONL journal of one dataset's decisions; the latest one per sample wins.

    Appends hold an exclusive `flock` while they catch up with lines other processes wrote,
    check the revision and write + fsync one line, so concurrent servers serialize. A line
    without its newline can only be the torn tail of a writer that died mid-append (its
    decision was never acknowledged): readers ignore it and the next append truncates it.
    Opening the journal never writes; the first decision creates `_review/`.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.latest: dict[str, Decision] = {}
        self.count = 0
        self._offset = 0  # bytes of complete lines read so far
        self._lines = 0
        self._identity: tuple[int, int] | None = None  # (device, inode) of the file read
        self._lock = threading.Lock()
        self.refresh()

    def revision(self, sample_id: str) -> int:
        current = self.latest.get(sample_id)
        return current.revision if current else 0

    def refresh(self) -> None:
        """Read lines appended since the last read (by this or another process)."""
        with self._lock:
            self._read_new()

    def _read_new(self) -> None:
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return
        identity = (stat.st_dev, stat.st_ino)
        if identity != self._identity or stat.st_size < self._offset:
            # replaced or truncated by hand: start over rather than misread from an offset
            self.latest, self.count, self._offset, self._lines = {}, 0, 0, 0
            self._identity = identity
        if stat.st_size == self._offset:
            return
        with open(self.path, "rb") as file:
            file.seek(self._offset)
            data = file.read()
        end = data.rfind(b"\n") + 1
        for line in data[:end].splitlines():
            self._lines += 1
            if not line.strip():
                continue
            try:
                decision = Decision.from_line(line)
            except (ValueError, TypeError, ReviewError) as error:
                raise ReviewError(
                    f"{self.path} line {self._lines}: not a decision record ({error}); "
                    "fix or delete that line"
                ) from None
            self.latest[decision.sample_id] = decision
            self.count += 1
        self._offset += end

    def append(
        self,
        sample_id: str,
        verdict: str,
        reason: str | None,
        note: str | None,
        reviewer: str,
        base_revision: int,
        override: bool = False,
    ) -> Decision:
        """Record a decision based on `base_revision`; DecisionConflict if it is stale."""
        check_decision(verdict, reason, note)
        reviewer = check_reviewer(reviewer)
        with self._lock:
            folder = self.path.parent
            new_folder = not folder.exists()
            folder.mkdir(exist_ok=True)
            new_file = not self.path.exists()
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)  # a second server over this dataset waits here
                self._read_new()
                if os.fstat(fd).st_size > self._offset:  # torn tail of a crashed writer
                    os.ftruncate(fd, self._offset)
                current = self.latest.get(sample_id)
                revision = current.revision if current else 0
                if base_revision != revision:
                    raise DecisionConflict(sample_id, current, base_revision)
                decision = Decision(
                    sample_id=sample_id,
                    verdict=verdict,
                    reason=reason,
                    note=note.strip() if note and note.strip() else None,
                    reviewer=reviewer,
                    decided_at=now_utc().isoformat(timespec="microseconds"),
                    revision=revision + 1,
                    base_revision=base_revision,
                    override=override,
                )
                line = decision.to_line()
                written = 0
                while written < len(line):
                    written += os.write(fd, line[written:])
                os.fsync(fd)  # durable before the page is told "saved"
                if new_file:
                    _fsync_dir(folder)
                if new_folder:
                    _fsync_dir(folder.parent)
                self._identity = (os.fstat(fd).st_dev, os.fstat(fd).st_ino)
                self._offset += len(line)
                self._lines += 1
                self.latest[sample_id] = decision
                self.count += 1
                return decision
            finally:
                os.close(fd)  # releases the lock


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- the dataset under review --------------------------------------------------------------


def open_sft_dataset(sft_dir: str | os.PathLike) -> Dataset:
    """Open `sft_dir` as a dataset of SFT candidates; DatasetError / ReviewError otherwise."""
    dataset = Dataset(sft_dir)
    if dataset.split != "sft":
        raise ReviewError(
            f"{dataset.path}: holds {dataset.split} rows; review works on SFT candidates "
            "(the build-sft output, e.g. OUT/sft)"
        )
    return dataset


def _sorted_index(dataset: Dataset) -> pa.Table:
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
        index = _sorted_index(self.dataset)
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


# --- HTTP ----------------------------------------------------------------------------------


class RangeNotSatisfiable(Exception):
    pass


def parse_range(header: str, size: int) -> tuple[int, int] | None:
    """The (first, last) byte of a single `bytes=` range, or None to serve the whole body
    (other units, several ranges, bad syntax: RFC 9110 lets a server ignore those).
    RangeNotSatisfiable when the range starts past the end."""
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, dash, last = spec.strip().partition("-")
    if not dash:
        return None
    if size == 0:  # no byte of an empty body can be asked for
        raise RangeNotSatisfiable
    try:
        if not first:  # suffix: the last N bytes
            length = int(last)
            if length <= 0:
                raise RangeNotSatisfiable
            return max(size - length, 0), size - 1
        start = int(first)
        end = int(last) if last else size - 1
    except ValueError:
        return None
    if end < start and last:  # "bytes=7-3" is invalid syntax: ignore it
        return None
    if start >= size:
        raise RangeNotSatisfiable
    return start, min(end, size - 1)


def create_app(session: ReviewSession, trusted_hosts: list[str] | None = None) -> "FastAPI":
    """The review web app over `session`. Errors are JSON `{"error": ...}`: 400 for a bad
    request, 404 for an unknown sample, 409 for a stale decision.

    `trusted_hosts` (the loopback names when bound to loopback) refuses other Host headers,
    so a web page elsewhere cannot reach the app through DNS rebinding.
    """
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse, Response
    from fastapi.staticfiles import StaticFiles
    from pydantic import BaseModel, ConfigDict
    from starlette.exceptions import HTTPException
    from starlette.middleware.trustedhost import TrustedHostMiddleware

    app = FastAPI(title="datagen review", docs_url=None, redoc_url=None, openapi_url=None)
    if trusted_hosts:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=trusted_hosts)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    no_store = {"Cache-Control": "no-store"}

    def error(status: int, message: str, **extra: Any) -> JSONResponse:
        return JSONResponse({"error": message, **extra}, status_code=status, headers=no_store)

    @app.exception_handler(BadDecision)
    def bad_request(request: Request, exc: BadDecision) -> JSONResponse:
        return error(400, str(exc))

    @app.exception_handler(UnknownSample)
    def not_found(request: Request, exc: UnknownSample) -> JSONResponse:
        return error(404, str(exc))

    @app.exception_handler(DecisionConflict)
    def conflict(request: Request, exc: DecisionConflict) -> JSONResponse:
        current = exc.current.as_dict() if exc.current else None
        return error(409, str(exc), current=current, revision=exc.revision)

    @app.exception_handler(RequestValidationError)
    def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: {e.get('msg')}"
            for e in exc.errors()
        )
        return error(400, f"bad request: {problems}")

    @app.exception_handler(HTTPException)
    def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return error(exc.status_code, str(exc.detail))

    @app.exception_handler(ReviewError)
    @app.exception_handler(DatasetError)
    @app.exception_handler(OSError)
    def server_error(request: Request, exc: Exception) -> JSONResponse:
        # e.g. a read-only dataset directory: the decision was NOT saved, say so
        return error(500, f"{type(exc).__name__}: {exc}")

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers=no_store)

    @app.get("/api/state")
    def state() -> JSONResponse:
        return JSONResponse(session.info(), headers=no_store)

    @app.get("/api/progress")
    def progress() -> JSONResponse:
        return JSONResponse(session.progress(), headers=no_store)

    @app.get("/api/samples")
    def samples(
        status: str = "all",
        style: str | None = None,
        csd_min: float | None = None,
        csd_max: float | None = None,
        dino_min: float | None = None,
        dino_max: float | None = None,
    ) -> JSONResponse:
        chosen = session.samples(status, style or None, csd_min, csd_max, dino_min, dino_max)
        return JSONResponse(
            {"samples": chosen, "count": len(chosen), "progress": session.progress()},
            headers=no_store,
        )

    @app.get("/api/samples/{sample_id}")
    def sample(sample_id: str) -> JSONResponse:
        return JSONResponse(session.detail(sample_id), headers=no_store)

    def serve_bytes(request: Request, sample_id: str, name: str, number: int | None) -> Response:
        data, content_type = session.media(sample_id, name, number)
        tag = session.media_tag(sample_id, name, number)
        headers = {"Accept-Ranges": "bytes", "ETag": tag, "Cache-Control": "private, max-age=3600"}
        if request.headers.get("if-none-match") == tag:
            return Response(status_code=304, headers=headers)
        requested = request.headers.get("range")
        if_range = request.headers.get("if-range")
        if requested and (if_range is None or if_range == tag):
            # Chrome asks for ranges to find the moov box at the end and to seek
            try:
                span = parse_range(requested, len(data))
            except RangeNotSatisfiable:
                return Response(
                    status_code=416, headers={**headers, "Content-Range": f"bytes */{len(data)}"}
                )
            if span is not None:
                first, last = span
                headers["Content-Range"] = f"bytes {first}-{last}/{len(data)}"
                return Response(
                    data[first : last + 1], 206, headers=headers, media_type=content_type
                )
        return Response(data, headers=headers, media_type=content_type)

    @app.api_route("/api/samples/{sample_id}/style_refs/{number}", methods=["GET", "HEAD"])
    def style_ref(request: Request, sample_id: str, number: int) -> Response:
        return serve_bytes(request, sample_id, "style_refs", number)

    @app.api_route("/api/samples/{sample_id}/{name}", methods=["GET", "HEAD"])
    def media(request: Request, sample_id: str, name: str) -> Response:
        if name == "style_refs":
            raise UnknownSample("style references are served one by one: style_refs/<number>")
        return serve_bytes(request, sample_id, name, None)

    class DecisionRequest(BaseModel):
        model_config = ConfigDict(extra="forbid", strict=True)
        verdict: str
        reason: str | None = None
        note: str | None = None
        base_revision: int
        override: bool = False
        reviewer: str | None = None

    @app.post("/api/samples/{sample_id}/decision")
    def decide(sample_id: str, body: DecisionRequest) -> JSONResponse:
        # FastAPI parses only application/json bodies: a cross-site form post cannot decide
        decision = session.decide(
            sample_id,
            body.verdict,
            body.reason,
            body.note,
            body.base_revision,
            reviewer=body.reviewer,
            override=body.override,
        )
        i = session._position_of(sample_id)
        return JSONResponse(
            {
                "decision": decision.as_dict(),
                "sample": session.summary(i),
                "progress": session.progress(),
            },
            headers=no_store,
        )

    return app


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening socket on (host, port); port 0 picks a free one. ReviewError when taken."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as error:
        raise ReviewError(f"cannot resolve host {host!r}: {error}") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # restart despite TIME_WAIT
    try:
        sock.bind(address)
        sock.listen(128)
    except OSError as error:
        sock.close()
        raise ReviewError(
            f"cannot listen on {host}:{port} ({error.strerror}); pick another --port"
        ) from None
    sock.set_inheritable(True)
    return sock


class ReviewServer:
    """The review app on a real socket (uvicorn). `run()` blocks (Ctrl-C stops it);
    `start()` / `stop()` run it in a thread (tests, notebooks)."""

    def __init__(self, session: ReviewSession, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT):
        import uvicorn

        self.session = session
        self.host = host
        self.socket = bind_socket(host, port)
        self.port = self.socket.getsockname()[1]
        self.url = review_url(session.path, host, self.port)
        trusted = list(LOOPBACK_HOSTS) if host in LOOPBACK_HOSTS else None
        config = uvicorn.Config(
            create_app(session, trusted_hosts=trusted),
            log_level="warning",
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=2,
        )
        self.server: uvicorn.Server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    def run(self) -> None:
        try:
            self.server.run(sockets=[self.socket])
        finally:
            self.socket.close()

    def start(self, timeout: float = 30.0) -> "ReviewServer":
        self._thread = threading.Thread(target=self.run, name="datagen-review", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise ReviewError(f"review server did not start on {self.url}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)


# --- links for summaries -------------------------------------------------------------------


def _url_host(host: str) -> str:
    if host in ("", "0.0.0.0", "::"):  # listening everywhere: link to this machine's name
        return socket.gethostname()
    return f"[{host}]" if ":" in host else host


def review_url(
    sft_dir: str | os.PathLike, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT
) -> str:
    """The page of `datagen review SFT_DIR --host HOST --port PORT`. The dataset travels in the
    query so the page warns when the server there reviews another dataset."""
    dataset = quote(str(Path(sft_dir).resolve()), safe="/")
    return f"http://{_url_host(host)}:{port}/?dataset={dataset}"


def review_command(
    sft_dir: str | os.PathLike, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT
) -> str:
    """The shell command that starts the review app over `sft_dir`."""
    command = ["datagen", "review", str(sft_dir)]
    if host != DEFAULT_HOST:
        command += ["--host", host]
    if port != DEFAULT_PORT:
        command += ["--port", str(port)]
    return shlex.join(command)


def review_markdown(
    sft_dir: str | os.PathLike, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT
) -> str:
    """A markdown paragraph for a run summary: how to start the review app and its link."""
    url = review_url(sft_dir, host, port)
    return (
        "## Human review\n\n"
        f"Start the review app with `{review_command(sft_dir, host, port)}`, then open "
        f"[{url}]({url}). When done: "
        f"`datagen review finalize {shlex.quote(str(sft_dir))} OUT`."
    )


# --- finalize ------------------------------------------------------------------------------


@dataclass
class FinalizeResult:
    total: int = 0
    accepted: int = 0
    rejected: int = 0
    pending: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    carried_rejects: int = 0  # the build's own rejects, copied from SFT_DIR as `filter` does
    unknown_decisions: int = 0  # journal entries for sample_ids the dataset does not hold
    out: str | None = None
    shards: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def check_out_dir(sft_dir: Path, out_dir: Path, overwrite: bool) -> None:
    """The refusals of `datagen filter`, for finalize's OUT."""
    from datagen.data.dataset import check_output_dir

    check_output_dir(sft_dir, out_dir, overwrite, "SFT_DIR", ReviewError)


def finalize_review(
    sft_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    limits: ShardLimits | None = None,
    on_rows: Callable[[int], None] | None = None,
) -> FinalizeResult:
    """Write the accepted candidates of `sft_dir` to `out_dir` as an SFT dataset (review
    fields filled from the journal) and the rejected ones as rejects (stage "review"). Samples
    still pending are left out and counted. SFT_DIR is only read."""
    from datagen.data.dataset import move_into_place  # the same all-or-nothing rename as filter

    sft_dir, out_dir = Path(sft_dir), Path(out_dir)
    check_out_dir(sft_dir, out_dir, overwrite)
    dataset = open_sft_dataset(sft_dir)
    index = _sorted_index(dataset)
    journal = DecisionJournal(journal_path(sft_dir))
    known = set(index["sample_id"].to_pylist())
    result = FinalizeResult(
        total=index.num_rows,
        unknown_decisions=sum(1 for sample_id in journal.latest if sample_id not in known),
    )
    reasons: Counter[str] = Counter()
    staging = out_dir.parent / f".{out_dir.name}.datagen-tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        writer = ShardWriter(staging, "sft", limits=limits)
        # one run id for the shards and the rejects, as `datagen filter` does
        rejects = RejectsWriter(staging, run_id=writer.run_id, flush_every=1 << 30)
        with writer, rejects:
            for _, _, table in dataset.iter_row_groups():
                accepted = _finalize_row_group(table, journal, rejects, reasons, result)
                if accepted is not None:
                    writer.write(accepted)
                if on_rows:
                    on_rows(table.num_rows)
            carried = dataset.rejects()
            rejects.add_table(carried)
            result.carried_rejects = carried.num_rows
        result.shards = writer.committed_shards
        move_into_place(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    result.reasons = dict(sorted(reasons.items()))
    result.out = str(out_dir)
    return result


def _finalize_row_group(
    table: pa.Table,
    journal: DecisionJournal,
    rejects: RejectsWriter,
    reasons: Counter[str],
    result: FinalizeResult,
) -> pa.Table | None:
    """Route one row group: rejects recorded, accepted rows returned with review fields."""
    columns = [
        "sample_id",
        "source_uri",
        "clip_start",
        "style_id",
        "review_status",
        "review_reason",
        "review_note",
        "reviewer",
        "reviewed_at",
    ]
    rows = table.select(columns).to_pylist()
    keep: list[int] = []
    review: dict[str, list] = {name: [] for name in columns[4:]}
    for position, row in enumerate(rows):
        decision = journal.latest.get(row["sample_id"])
        if decision is not None:
            verdict, reason, note = decision.verdict, decision.reason, decision.note
            reviewer, reviewed_at = decision.reviewer, decision.decided_at_datetime
        else:  # never decided here: the row's own review fields stand (pending for build-sft)
            verdict, reason = row["review_status"] or PENDING, row["review_reason"]
            note, reviewer, reviewed_at = row["review_note"], row["reviewer"], row["reviewed_at"]
        if verdict == "accepted":
            keep.append(position)
            for name, value in zip(
                columns[4:], (verdict, None, note, reviewer, reviewed_at), strict=True
            ):
                review[name].append(value)
            result.accepted += 1
        elif verdict == "rejected":
            reason = reason or "other"
            rejects.add(
                row["sample_id"],
                row["source_uri"],
                stage="review",
                reason=reason,
                detail=f"by {reviewer or 'unknown'}" + (f": {note}" if note else ""),
                clip_start=row["clip_start"],
                style_id=row["style_id"],
            )
            reasons[reason] += 1
            result.rejected += 1
        else:
            result.pending += 1
    if not keep:
        return None
    accepted = table.take(pa.array(keep, pa.int64()))
    for name, values in review.items():
        position = accepted.schema.get_field_index(name)
        column_field = accepted.schema.field(position)
        accepted = accepted.set_column(position, column_field, pa.array(values, column_field.type))
    return accepted
