// EdgeGuard fleet dashboard: the device detail drawer and its signed actions. Loaded after dashboard.js
// (whose state S and helpers it uses); device text goes through esc() or textContent, never markup.
"use strict";

function fact(label, value) {
  return `<dt>${esc(label)}</dt><dd>${value}</dd>`;
}

function chart(label, values, unit) {
  const present = (values || []).filter((v) => v !== null && v !== undefined);
  const lastv = present.length ? num(present[present.length - 1], unit === "" ? 0 : 1) + unit : "–";
  return `<div class="chart"><div class="chart-label"><span>${label}</span><span>${lastv}</span></div>${spark(values, "big", 160, 44)}</div>`;
}

function renderDetail(doc) {
  const d = doc.device;
  S.devices.set(keyOf(d), d);
  $("d-title").textContent = d.device;
  $("d-sub").textContent = d.fleet;
  $("d-dot").className = "dot s-" + d.status;
  const p = $("d-problems");
  p.textContent = d.problems.length ? d.problems.join(" · ") : "No problem: online and serving.";
  p.className = "problems" + (d.problems.length ? "" : " none");
  const since = d.since ? `${d.online === false ? "offline" : "online"} since ${clock(d.since)} (${ago(nowServer() - d.since)})` : d.status;
  $("d-facts").innerHTML = [
    fact("Status", esc(since)),
    fact("Last heartbeat", d.last_heartbeat ? `${esc(clock(d.last_heartbeat))} · ${esc(ago(hbAge(d)))} ago` : "none yet"),
    fact("Model", esc(modelOf(d)) || "–"),
    fact("Fast path", esc([d.backend, d.accelerator].filter(Boolean).join(" / ")) || "–"),
    fact("State", esc(d.state || "–")),
    fact("Groups", esc((d.groups || []).join(", ")) || "–"),
    fact("Latency", `p50 ${num(d.latency_p50_ms, 1)} ms · p99 ${num(d.latency_p99_ms, 1)} ms`),
    fact("Inferences", `${num(d.inferences, 0)} · ${num(d.inferences_per_s, 2)}/s · rejected ${num(d.rejected, 0)}`),
    fact("Outbox", `${num(d.outbox_depth, 0)} waiting · oldest ${esc(ago(d.outbox_oldest_age_s))} · dropped ${num(d.outbox_dropped, 0)}`),
    fact("Supervisor", `${num(d.restarts, 0)} restarts · MTBF ${esc(ago(d.mtbf_s))} · MTTR ${esc(ago(d.mttr_s))}`),
    fact("Uptime", esc(ago(d.uptime_s))),
    fact("Last security event", d.last_security_event ? `${esc(d.last_security_event)} · ${esc(clock(d.last_security_at))}` : "none"),
  ].join("");
  const h = d.history || {};
  $("d-charts").innerHTML = chart("Latency p50", h.latency_ms, " ms") + chart("Inferences/s", h.rate, "") +
    chart("Outbox depth", h.outbox, "");
  $("d-results").innerHTML = doc.results.map((r) =>
    `<li><div class="meta">${esc(clock(r.received))}${r.id ? " · " + esc(r.id) : ""}${r.cut ? " · cut" : ""}</div><code>${esc(r.text)}</code></li>`,
  ).join("") || '<li class="muted">No result since the dashboard started.</li>';
  $("d-events").innerHTML = doc.events.map((e) => eventItem(e, false)).join("") ||
    '<li class="muted">No event since the dashboard started.</li>';
}

async function openDetail(key) {
  S.detail = key;
  $("d-answers").innerHTML = "";
  $("detail").hidden = false;
  $("backdrop").hidden = false;
  $("d-actions").hidden = !S.actions;
  await refreshDetail();
}

let detailBusy = false;
async function refreshDetail() {
  if (!S.detail || detailBusy) return;
  detailBusy = true;
  try {
    const r = await fetch("/api/device/" + S.detail.split("/").map(encodeURIComponent).join("/"));
    if (r.ok) renderDetail(await r.json());
  } finally {
    detailBusy = false;
  }
}

function closeDetail() {
  S.detail = null;
  $("detail").hidden = true;
  $("backdrop").hidden = true;
}

function answerHtml(a) {
  if (a.pending) return `<li class="v-pending"><span class="verdict">… ${esc(a.action)}</span> sent, waiting for the signed answer</li>`;
  if (a.error) return `<li class="v-forged"><span class="verdict">✗ ${esc(a.action)}</span> ${esc(a.error)}</li>`;
  const ms = a.latency_ms !== null && a.latency_ms !== undefined ? ` · ${num(a.latency_ms, 0)} ms` : "";
  if (a.verdict && a.verdict.startsWith("verified")) {
    const body = a.ok ? `<code>${esc(JSON.stringify(a.result))}</code>` : `refused: ${esc(a.check)}: ${esc(a.why)}`;
    const cls = a.ok ? "v-verified" : "v-refused";
    return `<li class="${cls}" data-verdict="verified"><span class="verdict">✓ ${esc(a.action)} · ${esc(a.verdict)}</span>${ms}<br>${body}</li>`;
  }
  const cls = a.verdict === "forged" ? "v-forged" : "v-none";
  const mark = a.verdict === "forged" ? "✗ FORGED" : "no answer";
  return `<li class="${cls}" data-verdict="${esc(a.verdict)}"><span class="verdict">${mark} · ${esc(a.action)}</span> ${esc(a.why)}` +
    `${(a.forged || []).length ? "<br>" + a.forged.map(esc).join("<br>") : ""}</li>`;
}

async function act(action) {
  if (!S.detail) return;
  const [fleet, device] = S.detail.split("/");
  let reason = null;
  if (action === "rollback") {
    reason = window.prompt(`Roll ${device} back to its previous model? Reason:`, "operator rollback from the dashboard");
    if (reason === null) return;
  }
  const list = $("d-answers");
  const item = document.createElement("li");
  list.prepend(item);
  item.outerHTML = answerHtml({ action, pending: true });
  const slot = list.firstElementChild;
  const buttons = document.querySelectorAll("#d-actions button");
  buttons.forEach((b) => { b.disabled = true; });
  try {
    const r = await fetch("/api/action", {
      method: "POST",
      headers: { "Content-Type": "application/json", "X-EdgeGuard": "1" },
      body: JSON.stringify({ fleet, device, action, reason }),
    });
    const doc = await r.json();
    slot.outerHTML = answerHtml(r.ok ? doc : { action, error: doc.error || r.statusText });
  } catch (e) {
    slot.outerHTML = answerHtml({ action, error: String(e) });
  } finally {
    buttons.forEach((b) => { b.disabled = false; });
  }
}

