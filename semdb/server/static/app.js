// The semdb search page: one query per URL (?q=...&under=...), results from /api/search.
"use strict";

const FILTERS = ["under", "after", "before", "min_width", "min_height", "min_score"];
const PAGE = 30;
const $ = (id) => document.getElementById(id);
let state = { params: null, upload: null, offset: 0 };

function formParams() {
  const params = new URLSearchParams();
  const q = $("q").value.trim();
  if (q) params.set("q", q);
  for (const name of FILTERS) {
    const value = $(name).value.trim();
    if (value) params.set(name, value);
  }
  return params;
}

function fillForm(params) {
  $("q").value = params.get("q") || "";
  let anyFilter = false;
  for (const name of FILTERS) {
    $(name).value = params.get(name) || "";
    anyFilter = anyFilter || params.has(name);
  }
  if (anyFilter) $("filters").open = true;
}

async function fetchPage(params, upload, offset) {
  const query = new URLSearchParams(params);
  query.set("limit", PAGE);
  query.set("offset", offset);
  const options = upload ? { method: "POST", body: upload, headers: { "Content-Type": upload.type || "application/octet-stream" } } : {};
  const response = await fetch(`/api/search?${query}`, options);
  if (!response.ok) throw new Error(await errorMessage(response));
  return response.json();
}

// One readable line for a failed request: the server's own message, a parameter FastAPI refused
// ("min_width: Input should be a valid integer"), or the bare status when the body is not JSON.
async function errorMessage(response) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    return `the server answered ${response.status} ${response.statusText}`;
  }
  const detail = body && body.detail;
  if (typeof detail === "string") return detail;
  if (Array.isArray(detail) && detail.length) {
    return detail.map((item) => `${(item.loc || []).slice(1).join(".") || "request"}: ${item.msg}`).join("; ");
  }
  return `the server answered ${response.status} ${response.statusText}`;
}

function tile(hit) {
  const item = document.createElement("article");
  item.className = "hit";
  item.dataset.id = hit.id;
  item.dataset.path = hit.path;
  item.dataset.score = hit.score;
  const picture = document.createElement("img");
  picture.loading = "lazy";
  picture.alt = hit.path;
  picture.title = hit.path;
  const showMissing = () => {
    const note = document.createElement("div");
    note.className = "missing-original";
    note.textContent = "original missing or changed";
    item.classList.add("missing");
    picture.replaceWith(note);
  };
  if (hit.missing) {
    item.append(picture);
    showMissing();
  } else {
    picture.src = hit.thumbnail;
    picture.addEventListener("error", showMissing);
    picture.addEventListener("click", () => openViewer(hit));
    item.append(picture);
  }
  const meta = document.createElement("div");
  meta.className = "meta";
  const score = document.createElement("span");
  score.className = "score";
  score.textContent = hit.score.toFixed(3);
  const like = document.createElement("button");
  like.type = "button";
  like.className = "like";
  like.textContent = "more like this";
  like.addEventListener("click", () => moreLikeThis(hit.id));
  meta.append(score, like);
  const path = document.createElement("div");
  path.className = "path";
  path.textContent = hit.path;
  item.append(meta, path);
  return item;
}

function openViewer(hit) {
  $("full").src = hit.file;
  $("full").alt = hit.path;
  $("full-path").textContent = hit.path;
  const size = hit.width ? `${hit.width} × ${hit.height} px` : "";
  const modified = hit.modified ? `modified ${hit.modified.slice(0, 10)}` : "";
  $("full-info").textContent = [`score ${hit.score.toFixed(3)}`, size, modified].filter(Boolean).join(" · ");
  $("full-like").onclick = () => { $("viewer").close(); moreLikeThis(hit.id); };
  $("viewer").showModal();
}

function moreLikeThis(id) {
  $("q").value = `id:${id}`;
  search(true);
}

async function show(append) {
  const status = $("status");
  status.classList.remove("error");
  status.textContent = "searching…";
  try {
    const page = await fetchPage(state.params, state.upload, state.offset);
    if (!append) $("grid").replaceChildren();
    for (const hit of page.results) $("grid").append(tile(hit));
    const shown = $("grid").children.length;
    status.textContent = `${shown} result${shown === 1 ? "" : "s"} for ${page.query} · ${page.timings.total_ms.toFixed(0)} ms`;
    $("more").hidden = !page.more;
  } catch (error) {
    status.classList.add("error");
    status.textContent = error.message;
    if (!append) $("grid").replaceChildren();
    $("more").hidden = true;
  }
}

function search(pushHistory, upload = null) {
  state = { params: formParams(), upload, offset: 0 };
  if (!upload && !state.params.has("q")) return;
  if (pushHistory && !upload) history.pushState(null, "", `/?${state.params}`);
  show(false);
}

async function loadStats() {
  try {
    const stats = await (await fetch("/api/stats")).json();
    $("stats").textContent = `${stats.images.toLocaleString()} images · ${stats.model} · ${stats.bits_per_image} bits each`;
  } catch (error) {
    $("stats").textContent = "";
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("search").addEventListener("submit", (event) => { event.preventDefault(); search(true); });
  // A changed filter searches again, once the form's own checks (whole pixels, say) accept it.
  for (const name of FILTERS) {
    $(name).addEventListener("change", () => { if ($("q").value.trim() && $("search").reportValidity()) search(true); });
  }
  $("upload").addEventListener("change", () => {
    const file = $("upload").files[0];
    if (file) search(false, file);
    $("upload").value = "";
  });
  $("more").addEventListener("click", () => { state.offset += PAGE; show(true); });
  window.addEventListener("popstate", () => { fillForm(new URLSearchParams(location.search)); search(false); });
  loadStats();
  fillForm(new URLSearchParams(location.search));
  search(false);
});
