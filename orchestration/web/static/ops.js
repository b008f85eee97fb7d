"use strict";
// The operations view: GET v1/stats every second, read by readStats() alone, shown as
// tiles, a chart of the last few minutes (canvas) and a table per expert (and replica).
const WINDOW_S = 300;
const samples = [];  // {t, inFlight, queued} per refresh, at most WINDOW_S seconds of them

// The one place that reads /v1/stats. Every field is optional, so older and newer shapes
// render: experts with or without `replicas` (label -> stats), the executor's per-replica
// `replicas` (expert -> label -> {in_flight}), `supervision` states. Missing shows as "–".
function readStats(raw) {
  const num = (v) => (typeof v === "number" && isFinite(v) ? v : null);
  const obj = (v) => (v && typeof v === "object" && !Array.isArray(v) ? v : {});
  const sum = (values) => (values.some((v) => num(v) !== null)
    ? values.reduce((acc, v) => acc + (num(v) ?? 0), 0) : null);
  const list = (v) => (Array.isArray(v) ? v.map(obj)
    : Object.entries(obj(v)).map(([id, r]) => ({ id, ...obj(r) })));
  const quantiles = (v) => ({ p50: num(obj(v).p50), p90: num(obj(v).p90), p99: num(obj(v).p99) });
  const pick = (o, ...keys) => keys.map((k) => o[k]).find((v) => v !== undefined && v !== null);
  const life = (o) => obj(o.supervision);
  // Ray's own restarts plus Chorus's re-creations after Ray gave up.
  const restartsOf = (o) => sum([pick(life(o), "ray_restarts") ?? o.ray_restarts,
                                 life(o).recreated, o.restarts]);
  const stateOf = (o) => String(pick(life(o), "status", "state") ?? pick(o, "state", "status")
                                ?? (o.error ? "down" : "ok"));
  const executor = obj(raw.executor), router = obj(raw.router);
  // Executor counters start absent and appear on their first increment.
  const counter = (key) => (executor.counters ? num(obj(executor.counters)[key]) ?? 0 : null);
  const requests = obj(raw.requests), series = obj(requests.series);
  const perExpert = obj(executor.in_flight_per_expert), pools = obj(executor.replicas);
  const seen = obj(executor.restarts_seen);  // older servers: restarts the executor noticed

  function unit(name, e, inFlight) {
    return {
      name, error: e.error ?? null, state: stateOf(e), inFlight,
      active: num(pick(e, "active", "running")), requests: num(e.requests),
      completed: num(e.completed), failed: num(e.failed), cancelled: num(e.cancelled),
      restarts: restartsOf(e), node: e.node_id ?? null,
    };
  }
  const COUNTS = ["active", "requests", "completed", "failed", "cancelled", "restarts"];
  const experts = Object.entries(obj(raw.experts)).map(([name, value]) => {
    const e = obj(value), pool = obj(pools[name]);
    const replicas = list(e.replicas).map((r, i) => {
      const id = String(pick(r, "id", "replica", "name") ?? i + 1);
      return unit(id, r, num(obj(pool[id]).in_flight) ?? num(r.in_flight));
    });
    const expert = unit(name, e, num(perExpert[name]) ?? sum(replicas.map((r) => r.inFlight)) ?? 0);
    // With replicas, an expert's counts are its replicas' (its own fields mirror one).
    if (replicas.length) COUNTS.forEach((key) => { expert[key] = sum(replicas.map((r) => r[key])); });
    expert.restarts ??= num(seen[name]);
    return { ...expert, replicas };
  });
  const control = [["executor", executor], ["router", router]].filter(([, o]) => o.supervision)
    .map(([role, o]) => ({ role, state: stateOf(o), restarts: restartsOf(o) }));
  const ended = Array.isArray(series.ended) ? series.ended.map((v) => num(v) ?? 0) : [];
  const tenants = Object.entries(obj(raw.tenants)).map(([name, value]) => {
    const t = obj(value), tokens = obj(t.tokens), left = obj(t.remaining);
    return {
      name, requests: num(t.requests), refused: sum(Object.values(obj(t.refused))) ?? 0,
      tokensIn: num(tokens.in), tokensOut: num(tokens.out), inFlight: num(t.in_flight),
      waiting: num(t.waiting), weight: num(t.weight ?? obj(t.limits).weight),
      left: `${count(num(left.requests))} / ${count(num(left.tokens))}`,
    };
  });
  return {
    inFlight: num(executor.active), maxInFlight: num(executor.max_in_flight),
    queued: num(executor.queued), rate: num(requests.rate_per_s),
    ttft: quantiles(requests.ttft_s), latency: quantiles(requests.latency_s),
    recentS: num(requests.recent_s),
    retries: counter("retried"), hedgesWon: counter("hedges_won"),
    hedges: counter("hedges_won") === null ? null : counter("hedges_won") + counter("hedges_lost"),
    timeouts: counter("timed_out"), failures: counter("failed"),
    refusals: counter("refused"), cancelled: counter("cancelled"),
    restarts: sum([...experts.map((e) => e.restarts), ...control.map((c) => c.restarts)]),
    control,
    series: { end: num(series.end), ended,
              failed: Array.isArray(series.failed) ? series.failed.map((v) => num(v) ?? 0) : [] },
    node: obj(raw.ingress).node_id ?? null,
    experts, tenants,
  };
}

const count = (v) => (v === null || v === undefined ? "–" : String(Math.round(v * 100) / 100));
const spread = (q) => `p90 ${Chorus.seconds(q.p90)} · p99 ${Chorus.seconds(q.p99)}`;
const TILES = [
  ["rate", "Requests / s", (s) => count(s.rate), () => "ended, last 10 s"],
  ["in-flight", "Tasks in flight", (s) => count(s.inFlight),
   (s) => (s.maxInFlight === null ? "" : `of ${s.maxInFlight} max`)],
  ["queued", "Tasks queued", (s) => count(s.queued), () => "accepted, not dispatched"],
  ["ttft", "TTFT p50", (s) => Chorus.seconds(s.ttft.p50), (s) => spread(s.ttft)],
  ["latency", "Latency p50", (s) => Chorus.seconds(s.latency.p50), (s) => spread(s.latency)],
  ["retries", "Retries", (s) => count(s.retries), () => "task attempts repeated"],
  ["hedges", "Hedges", (s) => count(s.hedges),
   (s) => (s.hedges ? `${count(s.hedgesWon)} won: a slow first token beaten` : "copies of slow first tokens")],
  ["timeouts", "Timeouts", (s) => count(s.timeouts), () => "tasks that ended timed out"],
  ["failures", "Failed tasks", (s) => count(s.failures), () => "after every retry"],
  ["restarts", "Restarts", (s) => count(s.restarts), () => "by Ray, or re-created by Chorus"],
  ["refusals", "Refusals", (s) => count(s.refusals), () => "429: queue full"],
  ["cancelled", "Cancelled", (s) => count(s.cancelled), () => "tasks of callers gone"],
  ["control", "Control plane",
   (s) => (s.control.length ? s.control.find((c) => c.state !== "ready")?.state || "ready" : "–"),
   (s) => s.control.map((c) => `${c.role} ${c.state}`).join(" · ")],
];

function renderTiles(stats) {
  const root = document.getElementById("tiles");
  for (const [id, label, value, sub] of TILES) {
    let tile = document.getElementById(`tile-${id}`);
    if (!tile) {
      tile = Chorus.el("div", "tile");
      tile.id = `tile-${id}`;
      tile.append(Chorus.el("span", "label", label), Chorus.el("span", "value"),
                  Chorus.el("span", "sub"));
      root.append(tile);
    }
    tile.querySelector(".value").textContent = value(stats);
    tile.querySelector(".sub").textContent = sub(stats);
  }
}

function renderExperts(stats) {
  const rows = [];
  const row = (unit, replica) => {
    const tr = document.createElement("tr");
    tr.className = replica ? "replica" : "expert";
    tr.dataset.name = unit.name;
    const state = Chorus.el("td", `state-cell${unit.error ? " down" : ""}`,
                            unit.error ? `${unit.state}: ${unit.error}` : unit.state);
    tr.append(Chorus.el("td", "", unit.name), state);
    for (const key of ["inFlight", "active", "requests", "completed", "failed", "cancelled",
                       "restarts"]) {
      const td = Chorus.el("td", key, count(unit[key]));
      tr.append(td);
    }
    tr.append(Chorus.el("td", "state-cell", unit.node ? unit.node.slice(0, 8) : "–"));
    rows.push(tr);
  };
  for (const expert of stats.experts) {
    row(expert, false);
    expert.replicas.forEach((replica) => row(replica, true));
  }
  document.querySelector("#experts tbody").replaceChildren(...rows);
}

function renderTenants(stats) {
  const rows = stats.tenants.map((t) => {
    const tr = document.createElement("tr");
    tr.dataset.name = t.name;
    tr.append(Chorus.el("td", "", t.name));
    for (const key of ["requests", "refused", "tokensIn", "tokensOut", "inFlight", "waiting",
                       "weight"]) {
      tr.append(Chorus.el("td", key, count(t[key])));
    }
    tr.append(Chorus.el("td", "state-cell left", t.left));
    return tr;
  });
  document.querySelector("#tenants tbody").replaceChildren(...rows);
}

// The chart spans the history there is: one minute at least, WINDOW_S at most.
function span(stats, now) {
  const { end, ended } = stats.series;
  const first = ended.findIndex((v) => v > 0);
  const served = end !== null && first >= 0 ? ended.length - first : 0;
  const watched = samples.length ? now - samples[0].t : 0;
  return Math.min(WINDOW_S, Math.max(60, Math.ceil(Math.max(served, watched) / 60) * 60));
}

function drawChart(stats) {
  const canvas = document.getElementById("chart");
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth, height = canvas.clientHeight;
  canvas.width = width * ratio;
  canvas.height = height * ratio;
  const g = canvas.getContext("2d");
  g.scale(ratio, ratio);
  const now = Date.now() / 1000, left = 36, bottom = height - 18;
  const range = span(stats, now);
  document.getElementById("chart-span").textContent =
    range === 60 ? "minute" : `${range / 60} minutes`;
  const x = (t) => left + (width - left - 8) * (1 - (now - t) / range);
  const { end, ended, failed } = stats.series;
  // Seconds up to `end`, which is still filling up: it is left out until complete.
  const perSecond = (values) => (end === null ? [] : values.slice(0, -1).map((v, i) =>
    [end - values.length + 1 + i, v]));
  const lines = [
    ["#3358d4", perSecond(ended)],
    ["#b42318", perSecond(failed)],
    ["#1f7a44", samples.map((s) => [s.t, s.inFlight])],
    ["#a86400", samples.map((s) => [s.t, s.queued])],
  ];
  const top = Math.max(1, ...lines.flatMap(([, points]) => points.map(([, v]) => v ?? 0)));
  const y = (v) => bottom - (bottom - 8) * (v / top);
  g.font = "11px system-ui, sans-serif";
  g.fillStyle = "#5f6b7a";
  g.strokeStyle = "#d9dee5";
  for (const v of [0, top / 2, top]) {
    g.beginPath(); g.moveTo(left, y(v)); g.lineTo(width - 8, y(v)); g.stroke();
    g.fillText(count(v), 4, y(v) + 4);
  }
  for (let ago = range; ago >= 0; ago -= range === 60 ? 15 : 60) {
    const label = !ago ? "now" : ago % 60 ? `-${ago} s` : `-${ago / 60} min`;
    g.fillText(label, Math.min(x(now - ago), width - 28), height - 4);
  }
  g.lineWidth = 1.6;
  for (const [color, points] of lines) {
    g.strokeStyle = color;
    g.beginPath();
    points.filter(([t, v]) => now - t <= range && v !== null).forEach(([t, v], i) =>
      (i ? g.lineTo(x(t), y(v)) : g.moveTo(x(t), y(v))));
    g.stroke();
  }
}

let refreshes = 0;
async function refresh() {
  const box = document.getElementById("notice");
  let stats = null;
  try {
    const response = await Chorus.request("v1/stats");
    if (!response.ok) throw await Chorus.problem(response);
    stats = readStats(await response.json());
    box.hidden = true;
  } catch (problem) {
    // The server refused (a problem from Chorus.problem) or could not be reached: say so
    // and keep polling; the tiles keep their last values until the next answer.
    box.hidden = false;
    box.textContent = problem.title ? `${problem.title}: ${problem.text}`
      : `Cannot reach Chorus: ${problem}`;
  } finally {
    setTimeout(refresh, 1000);
  }
  if (stats) render(stats);  // outside the try: a bug here is a page error, not "unreachable"
}

function render(stats) {
  const t = Date.now() / 1000;
  samples.push({ t, inFlight: stats.inFlight, queued: stats.queued });
  while (samples.length && t - samples[0].t > WINDOW_S) samples.shift();
  renderTiles(stats);
  renderExperts(stats);
  renderTenants(stats);
  drawChart(stats);
  refreshes += 1;
  document.body.dataset.refreshes = refreshes;
  document.getElementById("ops-status").textContent =
    `Updated ${new Date().toLocaleTimeString()} · refreshed every second` +
    (stats.recentS ? ` · percentiles over the last ${stats.recentS} s` : "");
}

refresh();
