"""The page ``gradad serve`` shows at /: drop or choose images and see each one's overlay, score
and decision as it comes back; the recent history with a filter; live counts of normal and
anomalous images; pause and resume of the folder source. One self-contained HTML file (no
external script, style or font), which talks to the JSON API with the bearer token the person
types in when the service asks for one (kept in the tab's sessionStorage)."""

__all__ = ["PAGE_HTML"]

PAGE_HTML = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>gradad serve</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<style>
body{font:14px/1.4 system-ui,sans-serif;margin:0;background:#f4f5f7;color:#1d2430}
header{background:#1d2430;color:#fff;padding:10px 20px;display:flex;gap:24px;align-items:center;flex-wrap:wrap}
header h1{font-size:18px;margin:0}.pill{padding:2px 10px;border-radius:10px;background:#33405a}
.count-normal{background:#1f7a3d}.count-anomalous{background:#b3261e}
main{padding:16px 20px;display:grid;grid-template-columns:minmax(320px,1fr) minmax(320px,1fr);gap:20px}
section{background:#fff;border-radius:8px;padding:14px;box-shadow:0 1px 3px #0002}
h2{font-size:15px;margin:0 0 10px}
#drop{border:2px dashed #8a94a6;border-radius:8px;padding:24px;text-align:center;cursor:pointer}
#drop.over{background:#e8eefc;border-color:#3366cc}
#results{display:flex;flex-direction:column;gap:10px;margin-top:12px}
.card{display:flex;gap:12px;align-items:center;border:1px solid #dde1e8;border-radius:6px;padding:8px}
.card img{flex:none;width:160px;height:auto;border-radius:4px;background:#eee}
.badge{font-weight:600;padding:1px 8px;border-radius:8px;color:#fff}
.badge.anomalous{background:#b3261e}.badge.normal{background:#1f7a3d}.badge.error{background:#6b7280}
table{width:100%;border-collapse:collapse}td,th{padding:4px 6px;border-bottom:1px solid #e5e7eb;text-align:left}
td img{width:72px;border-radius:3px}td.time{white-space:nowrap}
#token-box{display:none;background:#fff3cd;padding:10px 20px;margin:0}
button,select,input{font:inherit}
</style></head>
<body>
<form id="token-box">This service needs a token: <input id="token" type="password" size="30"
autocomplete="off"> <button id="token-save">Use token</button></form>
<header><h1>gradad serve</h1>
<span>model <b id="model">…</b></span><span>threshold <b id="threshold">…</b></span>
<span class="pill count-normal">normal <b id="count-normal">0</b></span>
<span class="pill count-anomalous">anomalous <b id="count-anomalous">0</b></span>
<span id="watch" hidden>folder source <b id="watch-state"></b> <button id="pause">Pause</button></span>
<span id="state" class="pill">connecting…</span></header>
<main>
<section><h2>Inspect images</h2>
<div id="drop">Drop images here, or <label><u>choose files</u>
<input id="files" type="file" accept="image/*" multiple hidden></label></div>
<div id="results"></div></section>
<section><h2>Recent inspections</h2>
<label>show <select id="filter"><option value="">all</option><option value="true">anomalous</option>
<option value="false">normal</option></select></label>
<table id="history"><thead><tr><th>overlay</th><th>received (UTC)</th><th>score</th><th>decision</th>
<th>item</th><th>source</th></tr></thead><tbody></tbody></table></section>
</main>
<script>
"use strict";
const $ = id => document.getElementById(id);
let token = sessionStorage.getItem("gradad-token") || "";
const blobs = new Map();  // inspection id -> object URL of its overlay

function headers(extra) {
  const h = Object.assign({}, extra || {});
  if (token) h["Authorization"] = "Bearer " + token;
  return h;
}
async function api(path, options) {
  const response = await fetch(path, Object.assign({}, options || {}, {headers: headers((options || {}).headers)}));
  if (response.status === 401) { $("token-box").style.display = "block"; throw new Error("token needed"); }
  return response;
}
async function overlay(record) {
  if (!blobs.has(record.id)) {
    const response = await api(record.overlay_url);
    if (!response.ok) throw new Error("overlay " + response.status);
    blobs.set(record.id, URL.createObjectURL(await response.blob()));
  }
  return blobs.get(record.id);
}
function badge(anomalous) {
  const b = document.createElement("span");
  b.className = "badge " + (anomalous ? "anomalous" : "normal");
  b.textContent = anomalous ? "ANOMALOUS" : "normal";
  return b;
}
async function inspect(file) {
  const card = document.createElement("div");
  card.className = "card";
  const img = document.createElement("img");
  img.alt = file.name;
  const text = document.createElement("div");
  text.textContent = file.name + ": scoring…";
  card.append(img, text);
  $("results").prepend(card);
  const form = new FormData();
  form.append("image", file, file.name);
  try {
    const response = await api("/v1/inspect", {method: "POST", body: form});
    const body = await response.json();
    if (!response.ok) {
      img.remove();
      const b = document.createElement("span");
      b.className = "badge error";
      b.textContent = response.status;
      text.textContent = file.name + ": " + body.error + " ";
      text.append(b);
      return;
    }
    card.dataset.id = body.id;  // before the overlay is fetched, so that prune() keeps it
    img.src = await overlay(body);
    text.textContent = file.name + ": score " + body.score.toFixed(4) + " (threshold " +
      body.threshold.toFixed(4) + ") ";
    text.append(badge(body.anomalous));
    refresh();
  } catch (e) {
    text.textContent = file.name + ": " + e.message;
  }
}
async function inspectAll(files) { for (const f of files) await inspect(f); }

let refreshing = false, again = false;
function prune(keep) {  // the overlays neither on the page nor in the history are let go
  for (const card of document.querySelectorAll("#results .card")) if (card.dataset.id) keep.add(card.dataset.id);
  for (const [id, url] of blobs) if (!keep.has(id)) { URL.revokeObjectURL(url); blobs.delete(id); }
}
async function refresh() {  // one at a time; a call during one runs it again after it (new filter, counts)
  if (refreshing) { again = true; return; }
  refreshing = true;
  try {
    do { again = false; await refreshOnce(); } while (again);
  } finally {
    refreshing = false;
  }
}
async function refreshOnce() {
  try {
    const status = await (await api("/v1/status")).json();
    const precision = status.model.precision === "fp32" ? "" : " (" + status.model.precision + ")";
    $("model").textContent = status.model.name + precision;
    $("threshold").textContent = status.threshold.toPrecision(5);
    $("count-normal").textContent = status.counts.normal;
    $("count-anomalous").textContent = status.counts.anomalous;
    $("state").textContent = status.ready ? "ready" : (status.error ? "failed: " + status.error : "loading model…");
    if (status.watch) {
      $("watch").hidden = false;
      $("watch-state").textContent = status.watch.paused ? "paused" : "running";
      $("pause").textContent = status.watch.paused ? "Resume" : "Pause";
    }
    const filter = $("filter").value;
    const page = await (await api("/v1/inspections?limit=20" + (filter ? "&anomalous=" + filter : ""))).json();
    const rows = [];
    for (const r of page.items) {
      const tr = document.createElement("tr");
      tr.dataset.id = r.id;
      const img = document.createElement("img");
      img.alt = r.id;
      img.src = await overlay(r);
      const cells = [img, r.received_at.replace("T", " ").slice(0, 19), r.score.toFixed(4), badge(r.anomalous),
                     r.item_id || "", r.source + (r.source_path ? ": " + r.source_path : "")];
      for (const c of cells) { const td = document.createElement("td"); td.append(c); tr.append(td); }
      tr.cells[1].className = "time";
      rows.push(tr);
    }
    $("history").tBodies[0].replaceChildren(...rows);
    prune(new Set(page.items.map(r => r.id)));
  } catch (e) {
    $("state").textContent = e.message;
  }
}
$("drop").addEventListener("click", e => { if (!e.target.closest("label")) $("files").click(); });
$("files").addEventListener("change", e => {
  const files = Array.from(e.target.files);
  e.target.value = "";  // choosing the same files again is a new change
  inspectAll(files);
});
$("drop").addEventListener("dragover", e => { e.preventDefault(); $("drop").classList.add("over"); });
$("drop").addEventListener("dragleave", () => $("drop").classList.remove("over"));
$("drop").addEventListener("drop", e => {
  e.preventDefault(); $("drop").classList.remove("over"); inspectAll(Array.from(e.dataTransfer.files));
});
$("filter").addEventListener("change", refresh);
$("pause").addEventListener("click", async () => {
  try {
    await api($("pause").textContent === "Pause" ? "/v1/pause" : "/v1/resume", {method: "POST"});
  } catch (e) {
    $("state").textContent = e.message;
    return;
  }
  refresh();
});
$("token-box").addEventListener("submit", e => {  // the button or Enter in the field
  e.preventDefault();
  token = $("token").value.trim();
  sessionStorage.setItem("gradad-token", token);
  $("token-box").style.display = "none";
  refresh();
});
refresh();
setInterval(refresh, 2000);
</script></body></html>
"""
