// EdgeGuard fleet dashboard: hand-written, no dependencies. State arrives by Server-Sent Events from
// /api/events (a snapshot, then updates with the devices that changed). Everything a device sent is
// untrusted text: it reaches the page through esc() or textContent, never as markup.
"use strict";

const ROW_H = 30;          // px, matches --row in dashboard.css
const OVERSCAN = 12;       // rows rendered above and below the visible ones
const FEED_MAX = 60;

const S = {
  devices: new Map(),      // "fleet/device" -> row from the server
  events: [],              // newest last
  eventKeys: new Set(),
  rollouts: [],
  groups: [],
  serverNow: 0, recvAt: 0, // server clock at the last message, and performance.now() then
  fleet: "", actions: false,
  sort: { key: "status", dir: 1 },
  filter: "", status: "all",
  order: [],               // keys, filtered and sorted
  detail: null,            // key of the device in the drawer
  dirtyOrder: true,
};

const $ = (id) => document.getElementById(id);
const ESC = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };
const esc = (v) => String(v ?? "").replace(/[&<>"']/g, (c) => ESC[c]);
const keyOf = (d) => d.fleet + "/" + d.device;
const nowServer = () => S.serverNow + (performance.now() - S.recvAt) / 1000;
const SEVERITY = { offline: 0, degraded: 1, online: 2 };

function num(v, digits) {
  if (v === null || v === undefined) return "–";
  return Number(v).toLocaleString(undefined, { maximumFractionDigits: digits, minimumFractionDigits: digits });
}

function ago(seconds) {
  if (seconds === null || seconds === undefined || !isFinite(seconds)) return "–";
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return s + " s";
  if (s < 3600) return Math.floor(s / 60) + " min";
  if (s < 86400) return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
  return Math.floor(s / 86400) + " d";
}

function clock(epoch) {
  if (!epoch) return "–";
  const d = new Date(epoch * 1000);
  return d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit", hour12: false });
}

function hbAge(d) {
  return d.last_heartbeat ? nowServer() - d.last_heartbeat : null;
}

function modelOf(d) {
  return d.model ? d.model + (d.version !== null && d.version !== undefined ? " v" + d.version : "") : "";
}

// ---------------------------------------------------------------------------------------- sparklines
function points(values, w, h) {
  const xs = [];
  const vals = values.map((v) => (v === null || v === undefined ? null : Number(v)));
  const present = vals.filter((v) => v !== null);
  if (present.length < 2) return null;
  const lo = Math.min(...present), hi = Math.max(...present);
  const span = hi - lo || 1;
  const step = w / (vals.length - 1);
  vals.forEach((v, i) => {
    if (v === null) return;
    const y = h - 1 - ((v - lo) / span) * (h - 2);
    xs.push((i * step).toFixed(1) + "," + y.toFixed(1));
  });
  return xs;
}

function spark(values, cls, w, h) {
  const pts = points(values || [], w, h);
  if (!pts) return `<svg class="${cls}" viewBox="0 0 ${w} ${h}" preserveAspectRatio="none"></svg>`;
  const first = pts[0].split(",")[0], last = pts[pts.length - 1].split(",")[0];
  const area = `${first},${h} ${pts.join(" ")} ${last},${h}`;
  return `<svg class="${cls}" viewBox="0 0 ${w} ${h}" preserveAspectRatio="none">` +
    `<polygon class="area" points="${area}"></polygon><polyline points="${pts.join(" ")}"></polyline></svg>`;
}

// ----------------------------------------------------------------------------------------- the table
const SORTERS = {
  status: (d) => [SEVERITY[d.status] ?? 3, d.device],
  device: (d) => [d.device, d.fleet],
  group: (d) => [(d.groups && d.groups[0]) || "~", d.device],
  model: (d) => [modelOf(d) || "~", d.device],
  heartbeat: (d) => [d.last_heartbeat ? -d.last_heartbeat : Infinity, d.device],
  rate: (d) => [d.inferences_per_s ?? -1, d.device],
  latency: (d) => [d.latency_p50_ms ?? -1, d.device],
  outbox: (d) => [d.outbox_depth ?? -1, d.device],
  restarts: (d) => [d.restarts ?? -1, d.device],
  problem: (d) => [d.problems.length ? 0 : 1, d.problems[0] || "", d.device],
};

function cmp(a, b) {
  for (let i = 0; i < a.length; i++) {
    if (a[i] < b[i]) return -1;
    if (a[i] > b[i]) return 1;
  }
  return 0;
}

function matches(d, words) {
  if (S.status !== "all" && d.status !== S.status) return false;
  if (!words.length) return true;
  const hay = [d.device, d.fleet, modelOf(d), d.accelerator, d.backend, ...(d.groups || []), ...d.problems,
    d.status].join(" ").toLowerCase();
  return words.every((w) => hay.includes(w));
}

function reorder() {
  const words = S.filter.toLowerCase().split(/\s+/).filter(Boolean);
  const sorter = SORTERS[S.sort.key];
  const rows = [];
  for (const d of S.devices.values()) if (matches(d, words)) rows.push([sorter(d), keyOf(d)]);
  rows.sort((a, b) => S.sort.dir * cmp(a[0], b[0]));
  S.order = rows.map((r) => r[1]);
  S.dirtyOrder = false;
}

function rowHtml(d) {
  const h = d.history || {};
  const age = hbAge(d);
  const stale = d.problems.some((p) => p.startsWith("no heartbeat"));
  return `<tr class="dev s-${d.status}" data-key="${esc(keyOf(d))}" data-device="${esc(d.device)}" data-status="${d.status}">` +
    `<td><span class="status"><i class="dot"></i><span class="status-text">${d.status}</span></span></td>` +
    `<td class="device" title="${esc(d.fleet)}/${esc(d.device)}">${esc(d.device)}</td>` +
    `<td>${esc((d.groups || []).join(", ")) || '<span class="muted">–</span>'}</td>` +
    `<td title="${esc(d.backend || "")} ${esc(d.accelerator || "")}">${esc(modelOf(d)) || '<span class="muted">–</span>'}</td>` +
    `<td class="num hb${stale ? " problem" : ""}" data-hb="1">${d.online === false ? '<span class="muted">' + esc(ago(age)) + "</span>" : esc(ago(age))}</td>` +
    `<td class="num"><span class="cell-spark">${spark(h.rate, "spark", 56, 18)}<span>${num(d.inferences_per_s, 1)}</span></span></td>` +
    `<td class="num"><span class="cell-spark">${spark(h.latency_ms, "spark", 56, 18)}<span>${d.latency_p50_ms === null ? "–" : num(d.latency_p50_ms, 1) + " ms"}</span></span></td>` +
    `<td class="num"><span class="cell-spark">${spark(h.outbox, "spark", 56, 18)}<span>${num(d.outbox_depth, 0)}</span></span></td>` +
    `<td class="num">${num(d.restarts, 0)}</td>` +
    `<td class="problem" title="${esc(d.problems.join("; "))}">${esc(d.problems[0] || "")}</td></tr>`;
}

function pad(height) {
  const tr = document.createElement("tr");
  tr.className = "pad";
  tr.style.height = height + "px"; // CSSOM, not a style attribute: allowed by the page's CSP
  return tr;
}

function renderTable() {
  if (S.dirtyOrder) reorder();
  const wrap = $("table-wrap");
  const head = wrap.querySelector("thead").offsetHeight;
  const first = Math.max(0, Math.floor((wrap.scrollTop - head) / ROW_H) - OVERSCAN);
  const count = Math.ceil(wrap.clientHeight / ROW_H) + 2 * OVERSCAN;
  const last = Math.min(S.order.length, first + count);
  const html = [];
  for (let i = first; i < last; i++) html.push(rowHtml(S.devices.get(S.order[i])));
  const body = $("rows");
  body.innerHTML = html.join("");
  body.prepend(pad(first * ROW_H));
  body.append(pad((S.order.length - last) * ROW_H));
  $("empty").hidden = S.order.length > 0;
  $("shown").textContent = S.order.length === S.devices.size ? `${S.devices.size} devices`
    : `${S.order.length} of ${S.devices.size} devices`;
}

// -------------------------------------------------------------------------------------- side panels
function renderSummary() {
  const n = { online: 0, degraded: 0, offline: 0 };
  for (const d of S.devices.values()) n[d.status] = (n[d.status] || 0) + 1;
  $("count-all").textContent = S.devices.size;
  $("count-online").textContent = n.online;
  $("count-degraded").textContent = n.degraded;
  $("count-offline").textContent = n.offline;
  document.title = (n.offline ? `(${n.offline} offline) ` : "") + "EdgeGuard fleet";
}

function renderModels() {
  const by = new Map();
  for (const d of S.devices.values()) {
    const m = modelOf(d) || "no model";
    by.set(m, (by.get(m) || 0) + 1);
  }
  const rows = [...by.entries()].sort((a, b) => b[1] - a[1]).slice(0, 12);
  const total = S.devices.size || 1;
  const box = $("models");
  box.innerHTML = rows.map(([m, c]) =>
    `<div class="bar-row"><span class="bar-label">${esc(m)}</span><span class="bar-count">${c} · ${Math.round((100 * c) / total)}%</span>` +
    `<div class="bar-track"><div class="bar-fill" data-share="${c / total}"></div></div></div>`).join("") ||
    '<p class="muted">No device yet.</p>';
  box.querySelectorAll(".bar-fill").forEach((el) => { el.style.width = (100 * Number(el.dataset.share)) + "%"; });
}

const ROLLOUT_BADGE = { running: "b-busy", halted: "b-warn", done: "b-ok", aborted: "b-bad" };
const WAVE_BADGE = { pending: "b-idle", deploying: "b-busy", probation: "b-busy", passed: "b-ok", failed: "b-bad" };

function renderRollouts() {
  const box = $("rollouts");
  if (!S.rollouts.length) { box.innerHTML = '<p class="muted">No rollout.</p>'; return; }
  const now = nowServer();
  box.innerHTML = S.rollouts.map((r) => {
    const back = r.waves.flatMap((w) => w.rolled_back);
    const waves = r.waves.map((w) => {
      const total = w.devices.length || 1;
      const nfail = Object.keys(w.failed).length;
      const busy = Math.max(0, w.devices.length - w.ok.length - nfail);
      const timer = w.state === "probation" && w.probation_until
        ? ` · probation ${w.probation_until > now ? ago(w.probation_until - now) + " left" : "ending"}` : "";
      const notes = [];
      if (nfail) notes.push(Object.entries(w.failed).slice(0, 3).map(([d, why]) => `${esc(d)}: ${esc(why)}`).join("; "));
      if (w.rolled_back.length) notes.push(`<span class="rolled-back">rolled back: ${w.rolled_back.slice(0, 6).map(esc).join(", ")}${w.rolled_back.length > 6 ? " …" : ""}</span>`);
      return `<li class="wave" data-wave="${w.index}"><span>Wave ${w.index + 1} · ${w.percent}%</span>` +
        `<span class="wave-bar"><span class="seg-ok" data-share="${w.ok.length / total}"></span><span class="seg-bad" data-share="${nfail / total}"></span>` +
        `<span class="seg-busy" data-share="${(w.state === "pending" ? 0 : busy) / total}"></span></span>` +
        `<span class="badge ${WAVE_BADGE[w.state]}">${w.state}</span>` +
        `<span class="wave-note">${w.ok.length}/${w.devices.length} ok${timer}${notes.length ? "<br>" + notes.join("<br>") : ""}</span></li>`;
    }).join("");
    return `<div class="rollout" data-rollout="${esc(r.id)}"><div class="rollout-head"><span class="rollout-title">${esc(r.id)}</span>` +
      `<span class="badge ${ROLLOUT_BADGE[r.state]}">${r.state}</span></div>` +
      `<div class="rollout-meta">${esc(r.model)} v${r.version} → ${esc(r.group)} · failures ${r.failures}/${r.max_failures}` +
      `${back.length ? ` · <span class="rolled-back">${back.length} rolled back</span>` : ""} · updated ${clock(r.updated)}</div>` +
      `<ol class="waves">${waves}</ol>${r.reason ? `<div class="rollout-reason">${esc(r.reason)}</div>` : ""}</div>`;
  }).join("");
  box.querySelectorAll(".wave-bar span").forEach((el) => { el.style.width = (100 * Number(el.dataset.share)) + "%"; });
}

// Site groups (docs/sites.md), as `fleet status --groups` computes them from the heartbeats' sources.group.
function renderGroups() {
  const box = $("groups");
  if (!S.groups.length) { box.innerHTML = '<p class="muted">No site group.</p>'; return; }
  box.innerHTML = S.groups.map((g) => {
    const members = g.members.map((d) => {
      const why = g.left[d];
      const load = g.load[d] === null || g.load[d] === undefined ? "–" : Math.round(100 * g.load[d]) + "%";
      return `<li class="member" data-member="${esc(d)}"><span>${esc(d)}</span>` +
        `<span class="badge ${why ? "b-warn" : "b-ok"}">${why ? "left" : "in share"}</span>` +
        `<span class="member-load">${load}</span>${why ? `<span class="why">${esc(why)}</span>` : ""}</li>`;
    }).join("");
    const streams = Object.entries(g.streams).map(([n, s]) => `${esc(n)} @ ${esc(s.holder)} #${s.fencing_token}`);
    return `<div class="group" data-group="${esc(g.group)}"><div class="rollout-head"><span class="rollout-title">${esc(g.group)}</span>` +
      `<span class="group-share">${g.joined.length}/${g.members.length} in share</span></div>` +
      `<div class="rollout-meta">redelivered ${g.redelivered} · failovers ${g.failovers}` +
      `${streams.length ? " · streams " + streams.join(", ") : ""}</div><ul class="members">${members}</ul></div>`;
  }).join("");
}

function eventItem(e, withDevice) {
  return `<li><time>${clock(e.time)}</time><span><span class="${e.security ? "what" : "ev-info"}">${esc(e.kind)}</span>` +
    `${withDevice ? ` <span class="who">${esc(e.device)}</span>` : ""}</span>` +
    `${e.reason ? `<span class="why">${esc(e.reason)}</span>` : ""}</li>`;
}

function renderSecurity() {
  const sec = S.events.filter((e) => e.security).slice(-FEED_MAX).reverse();
  $("security").innerHTML = sec.map((e) => eventItem(e, true)).join("") || '<li class="muted">None so far.</li>';
}

// ------------------------------------------------------------------------------------------ updates
let frame = 0;
const want = { table: false, side: false, rollouts: false, groups: false, security: false };
function schedule(parts) {
  Object.assign(want, parts);
  if (!frame) frame = requestAnimationFrame(render);
}

function render() {
  frame = 0;
  if (want.table) renderTable();
  if (want.side) { renderSummary(); renderModels(); }
  if (want.rollouts) renderRollouts();
  if (want.groups) renderGroups();
  if (want.security) renderSecurity();
  want.table = want.side = want.rollouts = want.groups = want.security = false;
  $("updated").textContent = "updated " + clock(S.serverNow);
}

function addEvents(events) {
  for (const e of events) {
    const k = `${e.time}|${e.fleet}|${e.device}|${e.kind}`;
    if (S.eventKeys.has(k)) continue;
    S.eventKeys.add(k);
    S.events.push(e);
  }
  while (S.events.length > 500) {
    const e = S.events.shift();
    S.eventKeys.delete(`${e.time}|${e.fleet}|${e.device}|${e.kind}`);
  }
}

function apply(msg) {
  S.serverNow = msg.now;
  S.recvAt = performance.now();
  if (msg.fleet !== undefined) {
    S.fleet = msg.fleet;
    $("fleet-name").textContent = msg.fleet === "+" ? "all fleets" : msg.fleet;
  }
  if (msg.actions !== undefined) S.actions = msg.actions && document.body.dataset.actions === "on";
  if (msg.type === "snapshot") {
    S.devices.clear();
    S.events = [];
    S.eventKeys.clear();
  }
  for (const d of msg.devices) S.devices.set(keyOf(d), d);
  addEvents(msg.events || []);
  if (msg.rollouts) S.rollouts = msg.rollouts;
  if (msg.groups) S.groups = msg.groups;
  S.dirtyOrder = true;
  schedule({ table: true, side: true, rollouts: !!msg.rollouts || msg.type === "snapshot", groups: !!msg.groups, security: (msg.events || []).length > 0 || msg.type === "snapshot" });
  if (S.detail && msg.devices.some((d) => keyOf(d) === S.detail)) refreshDetail();
}

function connect() {
  const conn = $("conn");
  const source = new EventSource("/api/events");
  source.onopen = () => { conn.dataset.state = "live"; $("conn-text").textContent = "live"; };
  source.onerror = () => { conn.dataset.state = "lost"; $("conn-text").textContent = "reconnecting"; };
  source.onmessage = (ev) => apply(JSON.parse(ev.data));
}

function setSort(key, dir) {
  S.sort = dir ? { key, dir } : S.sort.key === key ? { key, dir: -S.sort.dir } : { key, dir: 1 };
  document.querySelectorAll("thead th").forEach((th) => {
    th.setAttribute("aria-sort", th.dataset.sort === key ? (S.sort.dir > 0 ? "ascending" : "descending") : "none");
  });
  S.dirtyOrder = true;
  schedule({ table: true });
}

function setStatus(status) {
  S.status = status;
  document.querySelectorAll(".card").forEach((c) => c.classList.toggle("active", c.dataset.filter === status && status !== "all"));
  S.dirtyOrder = true;
  schedule({ table: true });
}

document.addEventListener("DOMContentLoaded", () => {
  document.querySelectorAll("thead th").forEach((th) => th.addEventListener("click", () => setSort(th.dataset.sort)));
  $("filter").addEventListener("input", (e) => { S.filter = e.target.value; S.dirtyOrder = true; schedule({ table: true }); });
  document.querySelectorAll(".card").forEach((c) => c.addEventListener("click", () => setStatus(c.dataset.filter)));
  $("table-wrap").addEventListener("scroll", () => schedule({ table: true }), { passive: true });
  window.addEventListener("resize", () => schedule({ table: true }));
  $("rows").addEventListener("click", (e) => {
    const tr = e.target.closest("tr.dev");
    if (tr) openDetail(tr.dataset.key);
  });
  $("d-close").addEventListener("click", closeDetail);
  $("backdrop").addEventListener("click", closeDetail);
  document.addEventListener("keydown", (e) => { if (e.key === "Escape") closeDetail(); });
  document.querySelectorAll("#d-actions button").forEach((b) => b.addEventListener("click", () => act(b.dataset.action)));
  setSort("status", 1);  // worst first: offline, then degraded
  // Ages and probation timers move with the clock: redraw the visible rows and rollouts once a second.
  setInterval(() => { if (S.serverNow) schedule({ table: true, rollouts: S.rollouts.length > 0 }); }, 1000);
  connect();
});
