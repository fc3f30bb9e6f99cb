// ephyr console: the few things a page cannot do without script. No inline script anywhere
// (the CSP forbids it); everything here reads the page's own data attributes or asks our own
// origin. The live audit feed, sparklines, and target reachability.
"use strict";

function liveFeed() {
  const list = document.getElementById("feed");
  const state = document.getElementById("feed-state");
  if (!list || !window.EventSource) return;
  const want = new URLSearchParams(location.search);
  const keys = ["agent", "task", "target", "kind", "decision", "event"];
  const src = new EventSource("/events/audit");
  src.onopen = () => { state.textContent = "Live: new events appear here as they are recorded."; };
  src.onerror = () => { state.textContent = "The live feed is disconnected; it retries on its own."; };
  src.addEventListener("skipped", (m) => {
    state.textContent = "Live: " + m.data + " event(s) not shown (the broker was busier than a page can follow).";
  });
  src.onmessage = (m) => {
    let e;
    try { e = JSON.parse(m.data); } catch (_) { return; }
    for (const k of keys) {
      const v = want.get(k);
      if (!v) continue;
      const got = k === "target" ? (e.action || {}).target : k === "decision" ? (e.decision || (e.code ? "error" : "")) : e[k];
      if (k === "task" ? (e.task !== v && e.root !== v) : got !== v) return;
    }
    const li = document.createElement("li");
    const what = e.action ? Object.entries(e.action).slice(0, 4).map(([k, v]) => k + "=" + (typeof v === "string" ? v : JSON.stringify(v))).join(" ") : "";
    li.textContent = [e.ts ? new Date(e.ts / 1000).toISOString() : "", e.kind + "/" + e.event, e.agent || "", e.decision || e.code || "", what].join("  ");
    list.prepend(li);
    while (list.children.length > 100) list.lastChild.remove();
  };
}

function draw(fig, points) {
  const line = fig.querySelector("polyline");
  const now = fig.querySelector(".now");
  if (!line) return;
  const max = Math.max(1, ...points);
  const step = points.length > 1 ? 300 / (points.length - 1) : 0;
  line.setAttribute("points", points.map((p, i) => (i * step).toFixed(1) + "," + (58 - (p / max) * 56).toFixed(1)).join(" "));
  if (now && points.length) now.textContent = String(points[points.length - 1]);
}

function sparklines() {
  const figs = document.querySelectorAll("figure.spark");
  if (!figs.length) return;
  figs.forEach((f) => draw(f, (f.dataset.points || "").split(",").filter((x) => x !== "").map(Number)));
  setInterval(async () => {
    try {
      const r = await fetch("/api/graphs", { credentials: "same-origin" });
      if (!r.ok) return;
      const d = await r.json();
      for (const s of d.series) {
        const f = document.querySelector('figure.spark[data-key="' + s.key + '"]');
        if (f) draw(f, s.points);
      }
    } catch (_) { /* next tick */ }
  }, 10000);
}

function reachability() {
  document.querySelectorAll(".reach[data-target]").forEach(async (el) => {
    try {
      const r = await fetch("/api/reach/" + encodeURIComponent(el.dataset.target), { credentials: "same-origin" });
      const d = await r.json();
      el.textContent = d.reachable ? "yes (" + d.ms + " ms)" : "no: " + (d.error || "unknown");
      el.className = "badge " + (d.reachable ? "ok" : "bad");
    } catch (_) {
      el.textContent = "unknown";
    }
  });
}

document.addEventListener("DOMContentLoaded", () => { liveFeed(); sparklines(); reachability(); });
