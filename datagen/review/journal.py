"""The decision journal: one decision per JSON line of `SFT_DIR/_review/decisions.jsonl`.

The latest decision per sample wins. A decision names the revision it was based on; a stale
one is refused (DecisionConflict). Also the review's errors and the vocabulary of a decision
(verdicts, reason codes) that the session, the web app and finalize share.
"""

import contextlib
import getpass
import json
import os
import threading
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from datagen.core.files import file_lock
from datagen.data.dataset import now_utc

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

REVIEW_DIR = "_review"
JOURNAL_NAME = "decisions.jsonl"
JOURNAL_FORMAT = 1
MAX_NOTE_CHARS = 2000
MAX_REVIEWER_CHARS = 100


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
            # an exclusive flock on the journal itself: a second server over this dataset waits
            with file_lock(self.path) as handle:
                fd = handle.fileno()  # opened for appending: each write lands at the end
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


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
