"""`datagen review`: the HTTP API, the decision journal, finalize and the CLI (no browser).

The web app is driven through FastAPI's TestClient, and once through a real uvicorn server on
an ephemeral 127.0.0.1 port; the CLI's `serve` runs once as a real process.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pyarrow.compute as pc
import pytest
import typer
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from datagen.cli import review as review_cli
from datagen.cli.review import review_app
from datagen.data.dataset import (
    Dataset,
    DatasetError,
    RejectsWriter,
    ShardLimits,
    ShardWriter,
    read_rejects,
)
from datagen.data.synthetic import make_row
from datagen.data.video import decode_mp4, decode_png
from datagen.review.app import (
    RangeNotSatisfiable,
    ReviewServer,
    create_app,
    parse_range,
    review_markdown,
    review_url,
)
from datagen.review.finalize import finalize_review
from datagen.review.journal import REASONS, REVIEW_DIR, DecisionJournal, ReviewError, journal_path
from datagen.review.session import ReviewSession
from datagen.tools.validate import validate_dataset

CSD = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, None]  # row 7 has no csd score


def write_sft(path: Path, count: int = 8, split: str = "sft", build_rejects: int = 2) -> Path:
    """`count` candidates in shards of 3 rows, row groups of 2, plus plan-stage rejects."""
    rows = [make_row(i, split=split) for i in range(count)]
    for i, row in enumerate(rows):
        row["csd_score"] = CSD[i % len(CSD)]  # make_row reads None as "draw a score"
    limits = ShardLimits(max_rows=3, row_group_rows=2)
    with ShardWriter(path, split, limits=limits) as writer:
        writer.write(rows)
    if build_rejects:
        with RejectsWriter(path, run_id=writer.run_id) as rejects:
            for i in range(build_rejects):
                rejects.add(f"r{i}", f"file:///videos/bad_{i}.mp4", "plan", "too_few_frames")
    return path


def tree_digest(path: Path) -> dict[str, str]:
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def sft_dir(tmp_path) -> Path:
    return write_sft(tmp_path / "build" / "sft")


def client_for(sft_dir: Path, reviewer: str = "alice") -> TestClient:
    return TestClient(create_app(ReviewSession(sft_dir, reviewer=reviewer)))


@pytest.fixture
def client(sft_dir) -> TestClient:
    return client_for(sft_dir)


def decide(client: TestClient, sample_id: str, verdict: str, reason=None, base=0, **extra):
    body = {"verdict": verdict, "reason": reason, "base_revision": base, **extra}
    return client.post(f"/api/samples/{sample_id}/decision", json=body)


def ids(response) -> list[str]:
    return [s["sample_id"] for s in response.json()["samples"]]


# --- listing, filters, progress ------------------------------------------------------------


def test_state_lists_every_candidate_pending_and_writes_nothing(client, sft_dir):
    before = tree_digest(sft_dir)
    state = client.get("/api/state").json()
    assert state["dataset"] == str(sft_dir.resolve())
    assert state["reviewer"] == "alice"
    assert [r["code"] for r in state["reasons"]] == list(REASONS)
    assert state["styles"] == ["claymation", "ink_wash", "pixel_art", "watercolor"]
    assert state["progress"] == {
        "total": 8,
        "reviewed": 0,
        "accepted": 0,
        "rejected": 0,
        "pending": 8,
        "by_reason": {},
    }
    assert state["first_unreviewed"] == "s00000000"
    listed = client.get("/api/samples").json()
    assert [s["sample_id"] for s in listed["samples"]] == [f"s{i:08d}" for i in range(8)]
    assert listed["samples"][7]["csd_score"] is None
    assert all(s["decision"]["verdict"] == "pending" for s in listed["samples"])
    assert tree_digest(sft_dir) == before  # looking writes nothing, not even _review/


def test_filters_by_status_style_and_score_range(client):
    assert ids(client.get("/api/samples", params={"style": "ink_wash"})) == [
        "s00000000",
        "s00000004",
    ]
    # bounds are inclusive; a sample without the score fails a bound on it
    assert ids(client.get("/api/samples", params={"csd_min": 0.3, "csd_max": 0.5})) == [
        "s00000002",
        "s00000003",
        "s00000004",
    ]
    assert "s00000007" not in ids(client.get("/api/samples", params={"csd_max": 1}))
    dino = client.get("/api/samples", params={"dino_min": 0.5}).json()["samples"]
    assert dino and all(s["dino_score"] >= 0.5 for s in dino)

    assert decide(client, "s00000001", "accepted").status_code == 200
    assert decide(client, "s00000002", "rejected", "weak_style").status_code == 200
    assert ids(client.get("/api/samples", params={"status": "accepted"})) == ["s00000001"]
    assert ids(client.get("/api/samples", params={"status": "rejected"})) == ["s00000002"]
    unreviewed = ids(client.get("/api/samples", params={"status": "unreviewed"}))
    assert unreviewed == [f"s{i:08d}" for i in (0, 3, 4, 5, 6, 7)]
    progress = client.get("/api/progress").json()
    assert (progress["reviewed"], progress["accepted"], progress["rejected"]) == (2, 1, 1)
    assert progress["by_reason"] == {"weak_style": 1}


@pytest.mark.parametrize(
    "params",
    [
        {"status": "maybe"},
        {"csd_min": 0.6, "csd_max": 0.2},
        {"csd_min": "abc"},
        {"dino_max": "nan"},
    ],
)
def test_bad_filters_are_400_with_a_json_error(client, params):
    response = client.get("/api/samples", params=params)
    assert response.status_code == 400
    assert response.json()["error"]


# --- media ---------------------------------------------------------------------------------


def test_videos_and_images_are_served_from_the_shards_and_decode(client, sft_dir):
    row = Dataset(sft_dir).get("s00000004")
    for name in ("raw_video", "stylized_video"):
        response = client.get(f"/api/samples/s00000004/{name}")
        assert response.status_code == 200
        assert response.headers["content-type"] == "video/mp4"
        assert response.headers["accept-ranges"] == "bytes"
        assert response.content == row[name]
        frames, info = decode_mp4(response.content)
        assert (info.num_frames, info.height, info.width) == (9, 32, 32)
        assert info.codec == "h264"
    for path in ("raw_first_frame", "stylized_first_frame", "style_refs/0", "style_refs/2"):
        response = client.get(f"/api/samples/s00000004/{path}")
        assert response.status_code == 200
        assert response.headers["content-type"] == "image/png"
        assert decode_png(response.content).shape == (32, 32, 3)
    detail = client.get("/api/samples/s00000004").json()
    assert detail["num_style_refs"] == 3
    assert detail["caption_ns"] == row["caption_ns"]
    assert detail["caption_sty"] == row["caption_sty"]
    assert detail["style_prompt"] == row["style_prompt"]
    assert detail["decision"]["revision"] == 0


def test_range_requests_and_etags(client):
    url = "/api/samples/s00000001/stylized_video"
    whole = client.get(url)
    data, tag = whole.content, whole.headers["etag"]
    size = len(data)
    first = client.get(url, headers={"Range": "bytes=0-99"})
    assert first.status_code == 206
    assert first.headers["content-range"] == f"bytes 0-99/{size}"
    assert first.headers["content-type"] == "video/mp4"
    rest = client.get(url, headers={"Range": "bytes=100-"})
    assert rest.status_code == 206 and first.content + rest.content == data
    tail = client.get(url, headers={"Range": "bytes=-10"})
    assert tail.status_code == 206 and tail.content == data[-10:]
    past = client.get(url, headers={"Range": f"bytes={size}-"})
    assert past.status_code == 416 and past.headers["content-range"] == f"bytes */{size}"
    several = client.get(url, headers={"Range": "bytes=0-1,5-6"})
    assert several.status_code == 200 and several.content == data  # allowed: whole body
    stale = client.get(url, headers={"Range": "bytes=0-9", "If-Range": '"other"'})
    assert stale.status_code == 200 and stale.content == data
    assert client.get(url, headers={"If-None-Match": tag}).status_code == 304


def test_parse_range_edge_cases():
    assert parse_range("bytes=0-0", 10) == (0, 0)
    assert parse_range("bytes=5-100", 10) == (5, 9)
    assert parse_range("bytes=-100", 10) == (0, 9)
    assert parse_range("items=0-1", 10) is None
    assert parse_range("bytes=x-1", 10) is None
    assert parse_range("bytes=7-3", 10) is None
    with pytest.raises(RangeNotSatisfiable):
        parse_range("bytes=-5", 0)


def test_unknown_samples_and_media_are_404_json(client, sft_dir):
    for path in (
        "/api/samples/s99999999",
        "/api/samples/s99999999/raw_video",
        "/api/samples/s00000000/style_refs/3",
        "/api/samples/s00000000/style_refs",
        "/api/samples/s00000000/captions",
        "/api/nothing",
    ):
        response = client.get(path)
        assert response.status_code == 404, path
        assert response.headers["content-type"] == "application/json"
        assert response.json()["error"]
    response = decide(client, "s99999999", "accepted")
    assert response.status_code == 404
    assert "s99999999" in response.json()["error"]
    assert not (sft_dir / REVIEW_DIR).exists()


@pytest.mark.parametrize(
    "body",
    [
        {"verdict": "maybe", "base_revision": 0},
        {"verdict": "accept", "base_revision": 0},
        {"verdict": "rejected", "base_revision": 0},
        {"verdict": "rejected", "reason": "ugly", "base_revision": 0},
        {"verdict": "accepted", "reason": "weak_style", "base_revision": 0},
        {"verdict": "rejected", "reason": "other", "base_revision": 0},
        {"verdict": "rejected", "reason": "other", "note": "  ", "base_revision": 0},
        {"verdict": "accepted"},
        {"verdict": "accepted", "base_revision": -1},
        {"verdict": "accepted", "base_revision": "0"},
        {"verdict": "accepted", "base_revision": 0, "colour": "red"},
        {"verdict": "accepted", "base_revision": 0, "note": "x" * 2001},
        {"verdict": "accepted", "base_revision": 0, "reviewer": " "},
        [],
    ],
)
def test_bad_decisions_are_400_and_write_nothing(client, sft_dir, body):
    response = client.post("/api/samples/s00000000/decision", json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]
    assert not (sft_dir / REVIEW_DIR).exists()


def test_a_non_json_post_cannot_decide(client, sft_dir):
    # a cross-site form post arrives as text/plain or form data: refused, nothing written
    body = json.dumps({"verdict": "accepted", "base_revision": 0})
    response = client.post(
        "/api/samples/s00000000/decision", content=body, headers={"Content-Type": "text/plain"}
    )
    assert response.status_code == 400
    assert not (sft_dir / REVIEW_DIR).exists()


# --- decisions: persistence, restart, conflicts --------------------------------------------


def test_decisions_are_persisted_at_once_and_survive_a_restart(client, sft_dir):
    accepted = decide(client, "s00000000", "accepted", note="crisp")
    assert accepted.status_code == 200
    saved = accepted.json()
    assert saved["decision"]["revision"] == 1 and saved["decision"]["reviewer"] == "alice"
    assert saved["progress"]["accepted"] == 1
    rejected = decide(client, "s00000001", "rejected", "other", note="hands melt")
    assert rejected.status_code == 200
    lines = journal_path(sft_dir).read_text().splitlines()
    assert [json.loads(line)["sample_id"] for line in lines] == ["s00000000", "s00000001"]

    reopened = client_for(sft_dir, reviewer="bob")  # a new app instance over the same dir
    state = reopened.get("/api/state").json()
    assert state["first_unreviewed"] == "s00000002"  # resumes where the review left off
    assert state["progress"]["reviewed"] == 2
    detail = reopened.get("/api/samples/s00000001").json()["decision"]
    assert detail["verdict"] == "rejected" and detail["reason"] == "other"
    assert detail["note"] == "hands melt" and detail["reviewer"] == "alice"
    assert detail["revision"] == 1
    # the decider changes their mind: based on the revision they saw, no conflict
    again = decide(reopened, "s00000001", "accepted", base=1)
    assert again.status_code == 200 and again.json()["decision"]["revision"] == 2


def test_a_stale_decision_is_refused_with_409_and_can_be_overridden(sft_dir):
    alice, bob = client_for(sft_dir, "alice"), client_for(sft_dir, "bob")
    # both pages show s3 at revision 0; bob decides first
    assert alice.get("/api/samples/s00000003").json()["decision"]["revision"] == 0
    assert decide(bob, "s00000003", "rejected", "artifacts", note="flicker").status_code == 200
    journal = journal_path(sft_dir).read_bytes()

    conflict = decide(alice, "s00000003", "accepted", base=0)
    assert conflict.status_code == 409
    body = conflict.json()
    assert "s00000003" in body["error"]
    assert body["revision"] == 1
    assert body["current"]["reviewer"] == "bob" and body["current"]["verdict"] == "rejected"
    assert journal_path(sft_dir).read_bytes() == journal  # nothing written

    override = decide(alice, "s00000003", "accepted", base=1, override=True)
    assert override.status_code == 200
    assert override.json()["decision"]["revision"] == 2
    assert override.json()["decision"]["override"] is True
    # and bob's page, still at revision 1, is now the stale one
    assert decide(bob, "s00000003", "rejected", "weak_style", base=1).status_code == 409
    records = [json.loads(line) for line in journal_path(sft_dir).read_text().splitlines()]
    assert [(r["reviewer"], r["verdict"], r["revision"]) for r in records] == [
        ("bob", "rejected", 1),
        ("alice", "accepted", 2),
    ]


def test_a_decision_written_by_another_process_is_seen_and_conflicts(client, sft_dir):
    script = (
        "import sys; from datagen.review.journal import DecisionJournal; "
        "DecisionJournal(sys.argv[1]).append('s00000005', 'rejected', 'weak_style', None, "
        "'carol', 0)"
    )
    subprocess.run([sys.executable, "-c", script, str(journal_path(sft_dir))], check=True)
    response = decide(client, "s00000005", "accepted", base=0)
    assert response.status_code == 409
    assert response.json()["current"]["reviewer"] == "carol"
    assert client.get("/api/progress").json()["rejected"] == 1


def test_a_torn_last_line_is_ignored_then_repaired(client, sft_dir):
    assert decide(client, "s00000000", "accepted").status_code == 200
    path = journal_path(sft_dir)
    with open(path, "ab") as journal:  # a writer killed mid-line: never acknowledged
        journal.write(b'{"format": 1, "sample_id": "s00000001", "verd')
    reopened = client_for(sft_dir)
    assert reopened.get("/api/progress").json()["reviewed"] == 1
    assert decide(reopened, "s00000001", "rejected", "artifacts").status_code == 200
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["sample_id"] for r in records] == ["s00000000", "s00000001"]


def test_a_corrupt_journal_line_is_a_clear_error(sft_dir):
    path = journal_path(sft_dir)
    path.parent.mkdir()
    path.write_text('{"format": 1, "sample_id": "s00000000", "verdict": "great"}\n')
    with pytest.raises(ReviewError, match="line 1: not a decision record"):
        DecisionJournal(path)


# --- bad datasets --------------------------------------------------------------------------


def test_an_empty_dir_a_missing_dir_and_a_ct_dataset_are_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no part-"):
        ReviewSession(tmp_path / "empty", reviewer="alice")
    with pytest.raises(DatasetError, match="no such directory"):
        ReviewSession(tmp_path / "missing", reviewer="alice")
    ct = write_sft(tmp_path / "ct", count=3, split="ct", build_rejects=0)
    with pytest.raises(ReviewError, match="holds ct rows"):
        ReviewSession(ct, reviewer="alice")
    with pytest.raises(ReviewError, match="holds ct rows"):
        finalize_review(ct, tmp_path / "out")
    assert not (ct / REVIEW_DIR).exists() and not (tmp_path / "out").exists()


def test_the_reviewer_comes_from_the_option_else_user(sft_dir, monkeypatch):
    monkeypatch.setenv("USER", "dora")
    assert ReviewSession(sft_dir).reviewer == "dora"
    assert ReviewSession(sft_dir, reviewer=" eve ").reviewer == "eve"
    monkeypatch.setattr("datagen.review.session.default_reviewer", lambda: None)
    with pytest.raises(ReviewError, match="--reviewer"):
        ReviewSession(sft_dir)


# --- finalize ------------------------------------------------------------------------------


def review_some(client: TestClient) -> None:
    """3 accepted (one after an override of a rejection), 3 rejected, 2 left pending."""
    assert decide(client, "s00000000", "accepted", note="clean").status_code == 200
    assert decide(client, "s00000001", "rejected", "weak_style").status_code == 200
    assert decide(client, "s00000002", "rejected", "artifacts", note="flicker").status_code == 200
    assert decide(client, "s00000003", "rejected", "weak_style").status_code == 200
    assert decide(client, "s00000003", "accepted", base=1).status_code == 200
    assert decide(client, "s00000004", "rejected", "other", note="logo").status_code == 200
    assert decide(client, "s00000006", "accepted").status_code == 200


def test_finalize_writes_exactly_the_accepted_rows(client, sft_dir, tmp_path):
    review_some(client)
    before = tree_digest(sft_dir)
    out = tmp_path / "final"
    result = finalize_review(sft_dir, out)
    assert (result.total, result.accepted, result.rejected, result.pending) == (8, 3, 3, 2)
    assert result.reasons == {"artifacts": 1, "other": 1, "weak_style": 1}
    assert result.carried_rejects == 2 and result.unknown_decisions == 0
    assert tree_digest(sft_dir) == before  # the candidates are only read

    report = validate_dataset(out)
    assert report.ok, [str(v) for v in report.violations]
    final = Dataset(out)
    assert final.split == "sft"
    rows = {
        row["sample_id"]: row
        for _, _, table in final.iter_row_groups()
        for row in table.to_pylist()
    }
    assert sorted(rows) == ["s00000000", "s00000003", "s00000006"]
    for row in rows.values():
        assert row["review_status"] == "accepted"
        assert row["reviewer"] == "alice"
        assert row["reviewed_at"] is not None and row["review_reason"] is None
    assert rows["s00000000"]["review_note"] == "clean"
    source = Dataset(sft_dir).get("s00000003")
    assert rows["s00000003"]["stylized_video"] == source["stylized_video"]

    rejects = read_rejects(out)
    review = rejects.filter(pc.equal(rejects["stage"], "review")).to_pylist()
    assert {(r["sample_id"], r["reason"]) for r in review} == {
        ("s00000001", "weak_style"),
        ("s00000002", "artifacts"),
        ("s00000004", "other"),
    }
    details = {r["sample_id"]: r["detail"] for r in review}
    assert details["s00000002"] == "by alice: flicker"
    assert rejects.num_rows == 5  # + the build's 2 plan rejects
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left

    # finalizing a finalized dataset keeps its rows and review fields as they are
    again = finalize_review(out, tmp_path / "again")
    assert (again.accepted, again.rejected, again.pending) == (3, 0, 0)
    assert Dataset(tmp_path / "again").get("s00000000")["review_note"] == "clean"


def test_finalize_refusals_write_nothing(client, sft_dir, tmp_path):
    review_some(client)
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("precious")
    cases = {
        "is SFT_DIR": sft_dir,
        "inside SFT_DIR": sft_dir / "out",
        "contains SFT_DIR": sft_dir.parent,
        "not empty": full,
    }
    before = tree_digest(tmp_path)
    for message, out in cases.items():
        with pytest.raises(ReviewError, match=message):
            finalize_review(sft_dir, out)
    assert tree_digest(tmp_path) == before
    result = finalize_review(sft_dir, full, overwrite=True)
    assert result.accepted == 3 and not (full / "keep.txt").exists()
    assert validate_dataset(full).ok


# --- CLI -----------------------------------------------------------------------------------

runner = CliRunner()


def datagen_app() -> typer.Typer:
    """The main app with the review group registered as datagen/cli/__init__.py does."""
    from datagen.cli import app

    if not any(info.name == "review" for info in app.registered_groups):
        app = typer.Typer()

        @app.command()
        def other() -> None:
            """A sibling command, so that `review` is a sub-group as in datagen.cli."""

        app.add_typer(review_app, name="review")
    return app


def test_cli_finalize_reports_counts_and_refuses_with_one_line(client, sft_dir, tmp_path):
    review_some(client)
    result = runner.invoke(datagen_app(), ["review", "finalize", str(sft_dir), str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    assert "accepted 3  rejected 3  pending 2" in result.output
    assert "weak_style: 1" in result.output and "artifacts: 1" in result.output
    assert "2 pending candidate(s)" in result.output
    as_json = runner.invoke(
        datagen_app(), ["review", "finalize", "--json", str(sft_dir), str(tmp_path / "j")]
    )
    assert json.loads(as_json.output)["accepted"] == 3
    refused = runner.invoke(datagen_app(), ["review", "finalize", str(sft_dir), str(sft_dir)])
    assert refused.exit_code == 1
    assert refused.output.startswith("error: ") and len(refused.output.splitlines()) == 1
    empty = tmp_path / "empty"
    empty.mkdir()
    refused = runner.invoke(datagen_app(), ["review", str(empty), "--reviewer", "x"])
    assert refused.exit_code == 1 and refused.output.startswith("error: ")


def test_cli_review_sft_dir_starts_the_server(sft_dir, monkeypatch):
    started = []
    monkeypatch.setattr(ReviewServer, "run", lambda self: started.append(self.url))
    result = runner.invoke(
        datagen_app(), ["review", str(sft_dir), "--port", "0", "--reviewer", "erin"]
    )
    assert result.exit_code == 0, result.output
    assert "reviewing 8 candidates" in result.output and "as erin" in result.output
    assert started and started[0].startswith("http://127.0.0.1:")
    assert started[0] in result.output
    explicit = runner.invoke(datagen_app(), ["review", "serve", str(sft_dir), "--port", "0"])
    assert explicit.exit_code == 0, explicit.output
    helped = runner.invoke(datagen_app(), ["review"])
    assert "finalize" in helped.output


def test_cli_defaults_match_the_library():
    from datagen.review import app as review_web

    assert review_cli.DEFAULT_HOST == review_web.DEFAULT_HOST
    assert review_cli.DEFAULT_PORT == review_web.DEFAULT_PORT
    assert review_cli.LOOPBACK_HOSTS == review_web.LOOPBACK_HOSTS
    # the CLI reads them from datagen.review.defaults: no web stack or pyarrow at every start
    code = (
        "import sys, datagen.cli; "
        "print([m for m in ('fastapi', 'uvicorn', 'pyarrow') if m in sys.modules])"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert loaded.stdout.strip() == "[]"


def test_cli_serve_as_a_process_answers_then_stops_on_ctrl_c(sft_dir):
    process = subprocess.Popen(
        [sys.executable, "-m", "datagen.cli.review", str(sft_dir), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "USER": "frank"},
    )
    try:
        url = None
        deadline = time.monotonic() + 60
        while url is None and time.monotonic() < deadline:
            line = process.stdout.readline()
            assert line, f"server exited early: {process.poll()}"
            match = re.search(r"open (http://\S+)", line)
            url = match.group(1) if match else None
        assert url, "no URL printed"
        base = url.split("/?")[0]
        state = httpx.get(f"{base}/api/state", timeout=10).json()
        assert state["reviewer"] == "frank" and state["progress"]["total"] == 8
    finally:
        process.send_signal(signal.SIGINT)
        rest, _ = process.communicate(timeout=20)
    assert process.returncode == 0, rest
    assert "stopped: 0 of 8 reviewed" in rest


# --- a real server, links ------------------------------------------------------------------


def test_a_real_server_on_an_ephemeral_loopback_port(sft_dir):
    server = ReviewServer(ReviewSession(sft_dir, reviewer="gina"), port=0).start()
    try:
        assert server.url.startswith(f"http://127.0.0.1:{server.port}/?dataset=")
        base = f"http://127.0.0.1:{server.port}"
        with httpx.Client(base_url=base, timeout=10) as http:
            page = http.get("/")
            assert page.status_code == 200 and "datagen review" in page.text
            assert http.get("/static/app.js").status_code == 200
            video = http.get("/api/samples/s00000002/raw_video", headers={"Range": "bytes=0-"})
            assert video.status_code == 206
            assert decode_mp4(video.content)[1].num_frames == 9
            saved = http.post(
                "/api/samples/s00000002/decision", json={"verdict": "accepted", "base_revision": 0}
            )
            assert saved.status_code == 200
            # a page on another site reaching the app by DNS rebinding carries its own Host
            rebound = http.get("/api/state", headers={"Host": "evil.example"})
            assert rebound.status_code == 400
    finally:
        server.stop()
    with pytest.raises(ReviewError, match="pick another --port"):
        busy = ReviewServer(ReviewSession(sft_dir, reviewer="gina"), port=0)
        try:
            ReviewServer(ReviewSession(sft_dir, reviewer="gina"), port=busy.port)
        finally:
            busy.socket.close()


def test_review_url_and_summary_markdown(sft_dir):
    url = review_url(sft_dir, "127.0.0.1", 8765)
    assert url == f"http://127.0.0.1:8765/?dataset={sft_dir.resolve()}"
    assert review_url(sft_dir, "::1", 9000).startswith("http://[::1]:9000/")
    assert "0.0.0.0" not in review_url(sft_dir, "0.0.0.0", 9000)
    markdown = review_markdown(sft_dir, port=9000)
    assert f"datagen review {sft_dir} --port 9000" in markdown
    assert "http://127.0.0.1:9000/" in markdown and "finalize" in markdown
