"""The review page in a real browser: headless Chromium from Debian's packages, via Selenium.

Runs the app as a user does (`python -m datagen.cli.review SFT_DIR`, the same code as
`datagen review SFT_DIR`), checks that both H.264 videos play in sync and show real frames,
accepts and rejects samples from the keyboard, resolves a conflict with another reviewer,
reloads, and finalizes. Screenshots go to /tmp/datagen-review-*.png.

Needs: apt-get install -y chromium chromium-driver (skipped, saying so, when they are missing)
and the `selenium` package (a dev dependency; no browser download: the Debian driver is used).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from datagen.data.dataset import Dataset, ShardLimits, ShardWriter, read_rejects
from datagen.data.synthetic import make_row
from datagen.review.journal import journal_path
from datagen.tools.validate import validate_dataset

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
SCREENSHOTS = Path("/tmp")
CHROME_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--mute-audio",
    "--autoplay-policy=no-user-gesture-required",
    "--window-size=1400,1000",
]


def run_cli(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "datagen.cli.review", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kwargs,
    )


@pytest.fixture
def sft_dir(tmp_path) -> Path:
    """6 candidates with 3-second videos (48 frames, 96x64), 2 rows per shard."""
    rows = [make_row(i, split="sft", num_frames=48, height=64, width=96) for i in range(6)]
    path = tmp_path / "build" / "sft"
    with ShardWriter(path, "sft", limits=ShardLimits(max_rows=2)) as writer:
        writer.write(rows)
    return path


@pytest.fixture
def server(sft_dir):
    """`datagen review SFT_DIR` on a free 127.0.0.1 port; yields its URL."""
    process = run_cli(str(sft_dir), "--port", "0", "--reviewer", "alice")
    url = None
    deadline = time.monotonic() + 60
    while url is None and time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        match = re.search(r"open (http://\S+)", line)
        url = match.group(1) if match else None
    if url is None:
        process.kill()
        pytest.fail(f"review server did not start: {process.communicate()[0]}")
    yield url
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=30)
    assert process.returncode == 0, output


@pytest.fixture
def browser(tmp_path):
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip(
            f"Chromium is not installed ({CHROMIUM}, {CHROMEDRIVER}); "
            "install it with: apt-get update && apt-get install -y chromium chromium-driver"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for flag in [*CHROME_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def wait_for(driver, condition, what: str, timeout: float = 30.0):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(
        lambda d: condition(d), message=f"timed out waiting for {what}"
    )


def press(driver, *keys: str) -> None:
    from selenium.webdriver.common.action_chains import ActionChains

    for key in keys:
        ActionChains(driver).send_keys(key).perform()


def shown_sample(driver) -> str:
    return driver.find_element("id", "s-id").text


def list_status(driver) -> dict[str, str]:
    """sample_id -> 'accepted' / 'rejected' / 'pending', from the sidebar."""
    return driver.execute_script(
        "return Object.fromEntries([...document.querySelectorAll('#list .item')].map("
        "i => [i.dataset.sampleId, ['accepted', 'rejected', 'pending'].find("
        "c => i.classList.contains(c))]))"
    )


VIDEO_STATE = """
const frame = (v) => {  // the frame on screen, drawn to a canvas: proof that it decoded
  const c = document.createElement('canvas');
  c.width = v.videoWidth; c.height = v.videoHeight;
  const g = c.getContext('2d');
  g.drawImage(v, 0, 0);
  const d = g.getImageData(0, 0, c.width, c.height).data;
  let sum = 0, distinct = new Set();
  for (let i = 0; i < d.length; i += 4) { sum += d[i] + d[i + 1] + d[i + 2]; distinct.add(d[i]); }
  return {mean: sum / (3 * d.length / 4), distinct: distinct.size};
};
return ['v-raw', 'v-sty'].map((id) => {
  const v = document.getElementById(id);
  return {readyState: v.readyState, time: v.currentTime, paused: v.paused,
          error: v.error && v.error.message, width: v.videoWidth, height: v.videoHeight,
          src: v.currentSrc, frame: v.readyState >= 2 ? frame(v) : null};
});
"""


def test_review_in_a_real_browser(browser, server, sft_dir, tmp_path):
    driver = browser
    driver.get(server)
    # resumes at the first unreviewed sample
    wait_for(driver, lambda d: shown_sample(d) == "s00000000", "the first sample")

    # both videos load, decode and play, in sync
    wait_for(
        driver,
        lambda d: all(v["readyState"] >= 2 for v in d.execute_script(VIDEO_STATE)),
        "both videos to have frames",
    )
    before = driver.execute_script(VIDEO_STATE)
    time.sleep(1.0)
    after = driver.execute_script(VIDEO_STATE)
    for start, end in zip(before, after, strict=True):
        assert end["error"] is None, end
        assert not end["paused"], end
        assert (end["width"], end["height"]) == (96, 64)
        assert end["time"] != start["time"], f"video does not advance: {start} -> {end}"
        assert end["frame"]["mean"] > 10 and end["frame"]["distinct"] > 8, end
    raw, stylized = after
    assert "raw_video" in raw["src"] and "stylized_video" in stylized["src"]
    drifts = []
    for _ in range(5):  # both loop: a drift near the 3 s duration is the wrap, not a lag
        raw, stylized = driver.execute_script(VIDEO_STATE)
        drift = abs(raw["time"] - stylized["time"])
        drifts.append(min(drift, 3.0 - drift))
        time.sleep(0.1)
    assert sorted(drifts)[2] < 0.2, f"videos play out of sync: drifts {drifts}"
    # space pauses both on the same frame; ',' and '.' step both a frame back and forward
    # (back first, so that the forward step never hits the end of the clip)
    press(driver, " ", ",")
    paused = wait_for(
        driver,
        lambda d: (
            (v := d.execute_script(VIDEO_STATE))
            and all(x["paused"] for x in v)
            and abs(v[0]["time"] - v[1]["time"]) < 0.002
            and v
        ),
        "both videos paused on one frame",
    )
    press(driver, ".")
    stepped = wait_for(
        driver,
        lambda d: (
            (v := d.execute_script(VIDEO_STATE))
            and abs(v[0]["time"] - paused[0]["time"] - 1 / 16) < 0.002
            and abs(v[0]["time"] - v[1]["time"]) < 0.002
            and v
        ),
        "a one-frame step of both videos",
    )
    assert all(x["paused"] for x in stepped)
    press(driver, " ")  # play again
    wait_for(
        driver, lambda d: not any(x["paused"] for x in d.execute_script(VIDEO_STATE)), "replay"
    )
    images = driver.execute_script(
        "return [...document.querySelectorAll('#refs img, #firsts img')].map("
        "i => [i.complete, i.naturalWidth, i.naturalHeight])"
    )
    assert images == [[True, 96, 64]] * 5  # 3 style references + 2 first frames

    # a = accept; the page moves on to the next sample
    press(driver, "a")
    wait_for(driver, lambda d: shown_sample(d) == "s00000001", "the move to s00000001")
    assert not driver.find_element("id", "reasons").is_displayed()
    # r, then 4 = artifacts
    press(driver, "r")
    wait_for(driver, lambda d: d.find_element("id", "reasons").is_displayed(), "reasons")
    press(driver, "4")
    wait_for(driver, lambda d: shown_sample(d) == "s00000002", "the move to s00000002")
    # arrows move without deciding
    press(driver, "\ue014")  # ArrowRight
    wait_for(driver, lambda d: shown_sample(d) == "s00000003", "next")
    press(driver, "\ue012")  # ArrowLeft
    wait_for(driver, lambda d: shown_sample(d) == "s00000002", "previous")
    # r, 6 = other: the note gets the focus, Enter submits
    press(driver, "r", "6")
    wait_for(
        driver, lambda d: d.switch_to.active_element.get_attribute("id") == "note", "note focus"
    )
    press(driver, "logo in the corner", "\ue007")  # Enter
    wait_for(driver, lambda d: shown_sample(d) == "s00000003", "the move to s00000003")
    assert not driver.find_element("id", "reasons").is_displayed()

    # another reviewer decides s00000003 while this page shows it: a = 409, shown; o overrides
    base = server.split("/?")[0]
    other = httpx.post(
        f"{base}/api/samples/s00000003/decision",
        json={"verdict": "rejected", "reason": "weak_style", "base_revision": 0, "reviewer": "bob"},
        timeout=10,
    )
    assert other.status_code == 200
    press(driver, "a")
    banner = wait_for(
        driver,
        lambda d: d.find_element("id", "banner").is_displayed() and d.find_element("id", "banner"),
        "the conflict banner",
    )
    assert "Conflict" in banner.text and "bob" in banner.text and "NOT saved" in banner.text
    assert shown_sample(driver) == "s00000003"  # stays on the sample
    driver.save_screenshot(str(SCREENSHOTS / "datagen-review-conflict.png"))
    press(driver, "o")
    wait_for(driver, lambda d: shown_sample(d) == "s00000004", "the move after the override")
    assert not driver.find_element("id", "banner").is_displayed()

    # reload: the decisions are there, the page stays on the sample in the address
    driver.refresh()
    wait_for(driver, lambda d: shown_sample(d) == "s00000004", "the reloaded page")
    wait_for(driver, lambda d: len(list_status(d)) == 6, "the list")
    assert list_status(driver) == {
        "s00000000": "accepted",
        "s00000001": "rejected",
        "s00000002": "rejected",
        "s00000003": "accepted",
        "s00000004": "pending",
        "s00000005": "pending",
    }
    progress = driver.find_element("id", "progress-text").text
    assert "reviewed 4 / 6" in progress and "accepted 2" in progress and "rejected 2" in progress
    driver.find_element("css selector", '#list .item[data-sample-id="s00000002"]').click()
    wait_for(driver, lambda d: shown_sample(d) == "s00000002", "a click on the list")
    status = driver.find_element("id", "s-status").text
    assert "rejected (other) by alice" in status and "logo in the corner" in status
    wait_for(
        driver,
        lambda d: all(v["readyState"] >= 2 for v in d.execute_script(VIDEO_STATE)),
        "videos after the reload",
    )
    time.sleep(0.5)  # let the first frames paint before the screenshot
    driver.save_screenshot(str(SCREENSHOTS / "datagen-review-page.png"))

    # a fresh visit (no sample in the address) resumes at the first unreviewed sample
    driver.get(server)
    wait_for(driver, lambda d: shown_sample(d) == "s00000004", "resume at first unreviewed")

    records = [json.loads(line) for line in journal_path(sft_dir).read_text().splitlines()]
    assert [(r["sample_id"], r["verdict"], r["reason"], r["reviewer"]) for r in records] == [
        ("s00000000", "accepted", None, "alice"),
        ("s00000001", "rejected", "artifacts", "alice"),
        ("s00000002", "rejected", "other", "alice"),
        ("s00000003", "rejected", "weak_style", "bob"),
        ("s00000003", "accepted", None, "alice"),
    ]
    assert records[-1]["override"] is True and records[-1]["revision"] == 2

    # finalize yields exactly the accepted rows
    out = tmp_path / "final"
    finalize = run_cli("finalize", str(sft_dir), str(out))
    output, _ = finalize.communicate(timeout=120)
    assert finalize.returncode == 0, output
    assert "accepted 2  rejected 2  pending 2" in output
    final = Dataset(out)
    kept = sorted(final.index()["sample_id"].to_pylist())
    assert kept == ["s00000000", "s00000003"]
    assert validate_dataset(out).ok
    assert {r["reviewer"] for r in (final.get(s) for s in kept)} == {"alice"}
    rejects = read_rejects(out).to_pylist()
    assert {(r["sample_id"], r["stage"], r["reason"]) for r in rejects} == {
        ("s00000001", "review", "artifacts"),
        ("s00000002", "review", "other"),
    }
