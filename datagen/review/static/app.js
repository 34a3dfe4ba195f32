// datagen review: the page of `datagen review SFT_DIR` (plain JS, no build step, no CDN).
//
// Talks to the JSON API of datagen/review/app.py. Every decision is sent with the revision of the
// sample this page showed; the server refuses a stale one with 409, and the page then shows
// the other decision and lets the reviewer override it on purpose (key o).
"use strict";

const $ = (id) => document.getElementById(id);
const query = new URLSearchParams(location.search);
const raw = $("v-raw");
const sty = $("v-sty");

// The page state; exposed as window.review for debugging and the browser test.
const S = {
  info: null, // /api/state: dataset, reviewer, reasons, styles, progress
  reviewer: null,
  list: [], // sample summaries passing the filters, in write order
  pos: -1, // index in list of the sample shown
  sample: null, // detail of the sample shown
  rejecting: false, // r was pressed: waiting for a reason key
  reason: null, // reason chosen, waiting for the note ('other')
  conflict: null, // a decision the server refused (409), kept for an override
  busy: false,
  playing: true, // the reviewer's intent; videos follow it
  token: 0, // guards against responses for a sample the reviewer already left
};
window.review = S;

async function api(path, options = {}) {
  let response;
  try {
    response = await fetch(path, options);
  } catch (error) {
    return { status: 0, ok: false, body: { error: `server unreachable (${error.message})` } };
  }
  let body;
  try {
    body = await response.json();
  } catch {
    body = { error: `${response.status} ${response.statusText}` };
  }
  return { status: response.status, ok: response.ok, body };
}

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text; // never innerHTML: captions are data
  return node;
}

function message(text, kind = "") {
  const box = $("message");
  box.textContent = text;
  box.className = kind;
}

function banner(text, kind = "") {
  const box = $("banner");
  box.replaceChildren();
  if (!text) {
    box.hidden = true;
    return box;
  }
  box.append(el("span", "", text));
  box.className = `banner ${kind}`;
  box.hidden = false;
  return box;
}

const fmt = (x, digits = 3) => (x === null || x === undefined ? "–" : Number(x).toFixed(digits));
const sampleUrl = (id) => `/api/samples/${encodeURIComponent(id)}`;

function describe(d) {
  if (!d || d.verdict === "pending") return "pending";
  let text = d.verdict;
  if (d.reason) text += ` (${d.reason})`;
  if (d.reviewer) text += ` by ${d.reviewer}`;
  if (d.decided_at) text += `, ${new Date(d.decided_at).toLocaleString()}`;
  if (d.note) text += ` — “${d.note}”`;
  return text;
}

// --- progress, filters, list ---------------------------------------------------------------

function renderProgress(p) {
  $("progress-text").textContent =
    `reviewed ${p.reviewed} / ${p.total} · accepted ${p.accepted} · ` +
    `rejected ${p.rejected} · pending ${p.pending}`;
  const share = (n) => (p.total ? `${(100 * n) / p.total}%` : "0");
  $("bar-accepted").style.width = share(p.accepted);
  $("bar-rejected").style.width = share(p.rejected);
}

const FILTERS = {
  status: "f-status",
  style: "f-style",
  csd_min: "f-csd-min",
  csd_max: "f-csd-max",
  dino_min: "f-dino-min",
  dino_max: "f-dino-max",
};

function filterQuery() {
  const params = new URLSearchParams();
  for (const [name, id] of Object.entries(FILTERS)) {
    const value = $(id).value.trim();
    if (value !== "" && !(name === "status" && value === "all")) params.set(name, value);
  }
  return params;
}

async function loadList() {
  const r = await api(`/api/samples?${filterQuery()}`);
  if (!r.ok) {
    message(r.body.error, "error");
    return false;
  }
  S.list = r.body.samples;
  renderProgress(r.body.progress);
  $("f-count").textContent = `${r.body.count} shown`;
  $("list").replaceChildren(...S.list.map((s, i) => listItem(s, i)));
  return true;
}

function listItem(s, i) {
  const item = el("div", `item ${s.decision.verdict}${i === S.pos ? " current" : ""}`);
  item.dataset.sampleId = s.sample_id;
  item.title = describe(s.decision);
  item.append(
    el("span", "dot"),
    el("code", "", s.sample_id),
    el("span", "meta", `${s.style_id} · csd ${fmt(s.csd_score, 2)}`),
  );
  item.addEventListener("click", () => show(i));
  return item;
}

function refreshItem(i) {
  const old = $("list").children[i];
  if (old) old.replaceWith(listItem(S.list[i], i));
}

function updateSummary(summary) {
  const i = S.list.findIndex((s) => s.sample_id === summary.sample_id);
  if (i >= 0) {
    S.list[i] = summary;
    refreshItem(i);
  }
  if (S.sample && S.sample.sample_id === summary.sample_id) {
    S.sample.decision = summary.decision;
    renderStatus();
  }
}

async function applyFilters() {
  const keep = S.sample && S.sample.sample_id;
  if (!(await loadList())) return;
  let i = S.list.findIndex((s) => s.sample_id === keep);
  if (i < 0) i = firstPending(0);
  await show(i < 0 ? 0 : i);
}

function firstPending(from) {
  for (let i = from; i < S.list.length; i++) {
    if (S.list[i].decision.verdict === "pending") return i;
  }
  return -1;
}

// --- one sample ----------------------------------------------------------------------------

async function show(i) {
  const empty = S.list.length === 0;
  $("empty").hidden = !empty;
  $("sample-body").hidden = empty;
  if (empty) {
    S.pos = -1;
    S.sample = null;
    raw.removeAttribute("src");
    sty.removeAttribute("src");
    return;
  }
  i = Math.max(0, Math.min(i, S.list.length - 1));
  const token = ++S.token;
  const previous = $("list").children[S.pos];
  if (previous) previous.classList.remove("current");
  S.pos = i;
  const current = $("list").children[i];
  if (current) {
    current.classList.add("current");
    current.scrollIntoView({ block: "nearest" });
  }
  cancelReject();
  clearConflict();
  const id = S.list[i].sample_id;
  const r = await api(sampleUrl(id));
  if (token !== S.token) return; // the reviewer moved on meanwhile
  if (!r.ok) {
    message(r.body.error, "error");
    return;
  }
  S.sample = r.body;
  updateSummary(r.body); // the decision may have changed since the list was loaded
  history.replaceState(null, "", `${location.search}#${encodeURIComponent(id)}`);
  $("note").value = "";
  renderSample(token);
}

function renderStatus() {
  const d = S.sample.decision;
  const badge = $("s-status");
  badge.textContent = describe(d);
  badge.className = `badge ${d.verdict}`;
}

function renderSample(token) {
  const s = S.sample;
  const base = sampleUrl(s.sample_id);
  $("s-id").textContent = s.sample_id;
  $("s-pos").textContent = `${S.pos + 1} / ${S.list.length}`;
  $("s-style").textContent = s.style_id;
  renderStatus();
  document.documentElement.style.setProperty("--aspect", `${s.width} / ${s.height}`);
  $("c-ns").textContent = s.caption_ns;
  $("c-sty").textContent = s.caption_sty;
  loadVideos(`${base}/raw_video`, `${base}/stylized_video`, token);

  const refs = [];
  for (let k = 0; k < s.num_style_refs; k++) {
    const img = el("img");
    img.src = `${base}/style_refs/${k}`;
    img.alt = `style reference ${k + 1}`;
    refs.push(img);
  }
  $("refs").replaceChildren(...refs);
  const firsts = ["raw_first_frame", "stylized_first_frame"].map((name) => {
    const img = el("img");
    img.src = `${base}/${name}`;
    img.alt = name.replaceAll("_", " ");
    return img;
  });
  $("firsts").replaceChildren(...firsts);

  const rows = [
    ["csd_score", fmt(s.csd_score)],
    ["dino_score", fmt(s.dino_score)],
    ["vlm_verdict", s.vlm_verdict ?? "–"],
    ["vlm_detail", s.vlm_detail ?? "–"],
    ["style_prompt", s.style_prompt],
    ["clip", `${s.num_frames} frames @ ${fmt(s.fps, 2)} fps, ${s.width}×${s.height}`],
    ["control", s.control_kind],
    ["source", `${s.source_uri} @ frame ${s.clip_start}`],
    ["seed", String(s.seed)],
    ["revision", String(s.decision.revision)],
  ];
  $("scores").tBodies[0].replaceChildren(
    ...rows.map(([name, value]) => {
      const tr = el("tr");
      tr.append(el("th", "", name), el("td", "", value));
      return tr;
    }),
  );
}

// --- videos, played in sync ----------------------------------------------------------------

function whenReady(video) {
  return new Promise((resolve) => {
    if (video.readyState >= 3) resolve();
    else video.addEventListener("canplay", resolve, { once: true });
  });
}

function loadVideos(rawUrl, styUrl, token) {
  raw.pause();
  sty.pause();
  raw.src = rawUrl;
  sty.src = styUrl;
  const rate = Number($("t-speed").value);
  raw.playbackRate = rate;
  sty.playbackRate = rate;
  Promise.all([whenReady(raw), whenReady(sty)]).then(() => {
    if (token !== S.token) return;
    raw.currentTime = 0;
    sty.currentTime = 0;
    if (S.playing) playBoth();
  });
}

function playBoth() {
  // muted videos may autoplay; a refusal leaves them paused, which the button shows
  raw.play().catch(() => {});
  sty.play().catch(() => {});
}

function frameSeconds() {
  return 1 / ((S.sample && S.sample.fps) || 16);
}

// The stylized video follows the raw one: a drift over 1.5 frames while playing (or any
// drift while paused) snaps it back. Both loop; the snap also realigns them at the wrap.
function syncTick() {
  if (raw.readyState >= 1 && sty.readyState >= 1 && !sty.seeking) {
    const drift = Math.abs(sty.currentTime - raw.currentTime);
    if (S.playing) {
      if (raw.paused && raw.readyState >= 2) raw.play().catch(() => {});
      if (sty.paused && !raw.paused) sty.play().catch(() => {});
      if (drift > 1.5 * frameSeconds()) sty.currentTime = raw.currentTime;
    } else {
      if (!sty.paused) sty.pause();
      if (drift > 0.001) sty.currentTime = raw.currentTime;
    }
  }
  const duration = raw.duration;
  if (Number.isFinite(duration) && duration > 0) {
    if (document.activeElement !== $("t-seek")) {
      $("t-seek").value = String(Math.round((1000 * raw.currentTime) / duration));
    }
    const frame = Math.floor(raw.currentTime / frameSeconds() + 1e-6) + 1;
    $("t-time").textContent = `${raw.currentTime.toFixed(2)} / ${duration.toFixed(2)} s · frame ${frame}`;
  }
  $("t-play").textContent = S.playing ? "pause" : "play";
  requestAnimationFrame(syncTick);
}

function togglePlay() {
  S.playing = !S.playing;
  if (S.playing) playBoth();
  else {
    raw.pause();
    sty.pause();
  }
}

function step(direction) {
  S.playing = false;
  raw.pause();
  sty.pause();
  const end = Number.isFinite(raw.duration) ? raw.duration : 0;
  const target = Math.min(Math.max(raw.currentTime + direction * frameSeconds(), 0), end);
  raw.currentTime = target;
  sty.currentTime = target;
}

function seekTo(fraction) {
  if (!Number.isFinite(raw.duration)) return;
  raw.currentTime = fraction * raw.duration;
  sty.currentTime = raw.currentTime;
}

// --- deciding ------------------------------------------------------------------------------

function startReject() {
  if (!S.sample) return;
  S.rejecting = true;
  S.reason = null;
  renderReasons();
  $("reasons").hidden = false;
  message("Reject: press 1–6 for the reason (Esc cancels).");
}

function cancelReject() {
  S.rejecting = false;
  S.reason = null;
  $("reasons").hidden = true;
}

function renderReasons() {
  $("reasons").replaceChildren(
    ...S.info.reasons.map((reason, k) => {
      const button = el("button", reason.code === S.reason ? "chosen" : "");
      button.type = "button";
      button.title = reason.label;
      button.dataset.reason = reason.code;
      button.append(el("kbd", "", String(k + 1)), document.createTextNode(` ${reason.code}`));
      button.addEventListener("click", () => pickReason(reason.code));
      return button;
    }),
  );
}

function pickReason(code) {
  S.reason = code;
  renderReasons();
  if (code === "other" && !$("note").value.trim()) {
    message("'other': type what is wrong in the note, then press Enter.", "error");
    $("note").focus();
    return;
  }
  decide("rejected", code);
}

async function decide(verdict, reason, override = false) {
  if (!S.sample || S.busy) return;
  const note = $("note").value.trim();
  if (verdict === "rejected" && reason === "other" && !note) {
    pickReason("other");
    return;
  }
  const base = override && S.conflict ? S.conflict.revision : S.sample.decision.revision;
  const body = {
    verdict,
    reason: verdict === "rejected" ? reason : null,
    note: note || null,
    base_revision: base,
    override,
  };
  if (S.reviewer !== S.info.reviewer) body.reviewer = S.reviewer;
  const id = S.sample.sample_id;
  S.busy = true;
  let r;
  try {
    r = await api(`${sampleUrl(id)}/decision`, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });
  } finally {
    S.busy = false;
  }
  if (r.status === 409) {
    showConflict(id, { verdict, reason: body.reason, note }, r.body);
    return;
  }
  if (!r.ok) {
    message(`not saved: ${r.body.error || `error ${r.status}`}`, "error");
    return;
  }
  cancelReject();
  clearConflict();
  updateSummary(r.body.sample);
  renderProgress(r.body.progress);
  const saved = `saved: ${id} ${describe(r.body.sample.decision)}`;
  if (S.sample.sample_id === id && S.pos + 1 < S.list.length) await show(S.pos + 1);
  message(saved, "ok");
}

function showConflict(id, mine, body) {
  cancelReject();
  const current = body.current ? { ...body.current, source: "journal" } : { verdict: "pending" };
  S.conflict = { sampleId: id, ...mine, revision: body.revision };
  updateSummary({ ...S.list.find((s) => s.sample_id === id), decision: current });
  const box = banner(
    `Conflict: ${id} is now ${describe(current)} — decided after this page loaded it. ` +
      `Your "${mine.verdict}${mine.reason ? ` (${mine.reason})` : ""}" was NOT saved. `,
    "conflict",
  );
  const overrideButton = el("button", "", "override with mine (o)");
  overrideButton.type = "button";
  overrideButton.addEventListener("click", override);
  const keepButton = el("button", "", "keep theirs (Esc)");
  keepButton.type = "button";
  keepButton.addEventListener("click", clearConflict);
  box.append(overrideButton, document.createTextNode(" "), keepButton);
  message("Conflict: see the banner above.", "error");
}

function override() {
  const c = S.conflict;
  if (!c || !S.sample || S.sample.sample_id !== c.sampleId) return;
  $("note").value = c.note || "";
  decide(c.verdict, c.reason, true);
}

function clearConflict() {
  if (S.conflict) {
    S.conflict = null;
    banner(S.datasetWarning || "");
  }
}

// --- navigation and keys -------------------------------------------------------------------

function next() {
  if (S.pos + 1 < S.list.length) show(S.pos + 1);
  else message("last sample of the list");
}

function prev() {
  if (S.pos > 0) show(S.pos - 1);
  else message("first sample of the list");
}

function nextUnreviewed() {
  let i = firstPending(S.pos + 1);
  if (i < 0) i = firstPending(0);
  if (i < 0) message("every sample in the list is reviewed", "ok");
  else show(i);
}

document.addEventListener("keydown", (event) => {
  if (event.ctrlKey || event.metaKey || event.altKey || !S.info) return;
  const target = event.target;
  if (target.matches("input, textarea, select")) {
    if (event.key === "Escape") {
      target.blur();
      cancelReject();
      event.preventDefault();
    } else if (event.key === "Enter" && !event.shiftKey && target.id === "note" && S.reason) {
      event.preventDefault();
      target.blur();
      decide("rejected", S.reason);
    } else if (event.key === "Enter" && target.closest("#filters")) {
      applyFilters();
    }
    return;
  }
  let handled = true;
  if (S.rejecting && /^[1-9]$/.test(event.key)) {
    const reason = S.info.reasons[Number(event.key) - 1];
    if (reason) pickReason(reason.code);
  } else {
    switch (event.key) {
      case "a":
        decide("accepted", null);
        break;
      case "r":
        startReject();
        break;
      case "ArrowRight":
        next();
        break;
      case "ArrowLeft":
        prev();
        break;
      case "u":
        nextUnreviewed();
        break;
      case " ":
        togglePlay();
        break;
      case ",":
        step(-1);
        break;
      case ".":
        step(1);
        break;
      case "n":
        $("note").focus();
        break;
      case "o":
        if (S.conflict) override();
        break;
      case "Escape":
        cancelReject();
        clearConflict();
        message("");
        break;
      default:
        handled = false;
    }
  }
  if (handled) event.preventDefault();
});

// A clicked button keeps the focus; blur it so space and arrows go to the shortcuts.
document.addEventListener("click", (event) => {
  const button = event.target.closest("button");
  if (button) button.blur();
});

// --- start ---------------------------------------------------------------------------------

async function init() {
  const r = await api("/api/state");
  if (!r.ok) {
    banner(`cannot load the review state: ${r.body.error}`, "conflict");
    return;
  }
  S.info = r.body;
  S.reviewer = query.get("reviewer") || S.info.reviewer;
  $("reviewer").textContent = S.reviewer;
  $("dataset").textContent = S.info.dataset;
  const wanted = query.get("dataset");
  if (wanted && wanted !== S.info.dataset) {
    S.datasetWarning = `This server reviews ${S.info.dataset}, not ${wanted} (the link's dataset).`;
    banner(S.datasetWarning);
  }
  $("f-style").append(
    ...S.info.styles.map((style) => {
      const option = el("option", "", style);
      option.value = style;
      return option;
    }),
  );
  for (const [name, id] of Object.entries(FILTERS)) {
    if (query.has(name)) $(id).value = query.get(name);
  }
  renderProgress(S.info.progress);

  $("f-apply").addEventListener("click", applyFilters);
  $("f-status").addEventListener("change", applyFilters);
  $("f-style").addEventListener("change", applyFilters);
  $("f-reset").addEventListener("click", () => {
    for (const id of Object.values(FILTERS)) $(id).value = "";
    $("f-status").value = "all";
    applyFilters();
  });
  $("b-accept").addEventListener("click", () => decide("accepted", null));
  $("b-reject").addEventListener("click", startReject);
  $("b-prev").addEventListener("click", prev);
  $("b-next").addEventListener("click", next);
  $("b-unreviewed").addEventListener("click", nextUnreviewed);
  $("t-play").addEventListener("click", togglePlay);
  $("t-back").addEventListener("click", () => step(-1));
  $("t-fwd").addEventListener("click", () => step(1));
  $("t-seek").addEventListener("input", (e) => seekTo(Number(e.target.value) / 1000));
  $("t-speed").addEventListener("change", (e) => {
    raw.playbackRate = Number(e.target.value);
    sty.playbackRate = Number(e.target.value);
  });

  for (const [video, name] of [
    [raw, "raw"],
    [sty, "stylized"],
  ]) {
    video.addEventListener("error", () => {
      if (video.error && video.getAttribute("src")) {
        message(`the ${name} video does not play here: ${video.error.message || video.error.code}`, "error");
      }
    });
  }

  if (!(await loadList())) return;
  // Resume: the sample in the address (a reload), else the first one nobody decided yet.
  const wantedId = decodeURIComponent(location.hash.slice(1));
  let i = wantedId ? S.list.findIndex((s) => s.sample_id === wantedId) : -1;
  if (i < 0) i = firstPending(0);
  await show(i < 0 ? 0 : i);
  requestAnimationFrame(syncTick);
  // Other reviewers' progress shows up without a reload.
  setInterval(async () => {
    const p = await api("/api/progress");
    if (p.ok) renderProgress(p.body);
  }, 15000);
}

init();
