"use strict";
// One request's events rendered as they arrive: the plan, the primary's text, a card per
// specialist (queued -> running -> done / failed / timed out), then the fused answer.
// Events are those of README "HTTP: POST /v1/orchestrate"; unknown ones are ignored.

const FINAL = { success: ["done", "done"], error: ["failed", "failed"],
                timeout: ["timeout", "timed out"], cancelled: ["cancelled", "cancelled"] };

function setState(node, state, label) {
  node.dataset.state = state;
  node.querySelector(".state").textContent = label || state;
}

function attemptsText(result) {
  const parts = [`${result.attempts} attempt${result.attempts === 1 ? "" : "s"}`,
                 Chorus.seconds(result.latency_s)];
  if (result.ttft_s != null) parts.push(`first token ${Chorus.seconds(result.ttft_s)}`);
  if (result.tokens) parts.push(`${result.tokens} tokens`);
  // Each attempt's replica (e.g. general#0) where the server says, else its expert.
  const who = result.replicas?.length ? result.replicas : result.served_by || [];
  if (who.length) parts.push(`served by ${who.join(" → ")}`);
  // Where each later attempt took the answer over (docs/failover.md), in characters.
  const cuts = (result.continued_from || []).filter((n) => n > 0);
  if (cuts.length) parts.push(`continued at ${cuts.join(", ")} chars`);
  // Hedges of a slow first token (docs/hedging.md): won = the copy answered first.
  if (result.hedges?.length) parts.push(`hedged (${result.hedges.join(", ")})`);
  if (result.retry_waits && result.retry_waits.length) {
    parts.push(`retried after ${result.retry_waits.map(Chorus.seconds).join(", ")}`);
  }
  return parts.join(" · ");
}

class Run {
  constructor(root) {
    this.root = root;
    this.cards = new Map();  // task_id -> card element
    this.primaryExpert = null;
    this.finished = false;
    this.primary = document.getElementById("primary-panel");
    this.answer = document.getElementById("answer-panel");
    for (const id of ["plan-strategy", "plan-reason", "plan-asked", "primary-text", "answer",
                      "cards"]) {
      document.getElementById(id).replaceChildren();
    }
    for (const panel of [this.primary, this.answer]) {
      panel.querySelector(".who")?.replaceChildren();
      panel.querySelector(".meta").textContent = "";
    }
    setState(this.primary, "queued");
    setState(this.answer, "waiting", "");
    root.hidden = true;  // shown by the plan: a refused request shows no run at all
  }

  handle(type, data) {
    const handler = this[`on_${type}`];
    if (handler) handler.call(this, data);
  }

  on_plan({ plan }) {
    this.root.hidden = false;
    document.getElementById("plan-strategy").textContent =
      `${plan.strategy} · priority ${plan.priority}`;
    document.getElementById("plan-reason").textContent = plan.reason || "–";
    const asked = document.getElementById("plan-asked");
    asked.append(Chorus.el("span", "chip primary", `${plan.primary.expert} (primary)`));
    this.primaryExpert = plan.primary.expert;
    this.primary.querySelector(".who").textContent = plan.primary.expert;
    for (const task of plan.experts) {
      asked.append(" ", Chorus.el("span", "chip", task.expert));
      this.cards.set(task.id, this.card(task));
    }
    document.getElementById("no-specialists").hidden = plan.experts.length > 0;
  }

  card(task) {
    const card = Chorus.el("article", "card");
    card.dataset.task = task.id;
    card.dataset.expert = task.expert;
    const head = Chorus.el("header");
    head.append(Chorus.el("strong", "who", task.expert), " ", Chorus.el("span", "state"));
    card.append(head, Chorus.el("p", "meta", `weight ${task.weight} · rank ${task.rank}`),
                Chorus.el("p", "reason"), Chorus.el("div", "text"));
    setState(card, "queued");
    document.getElementById("cards").append(card);
    return card;
  }

  // `task` events (running / retrying) come from newer servers; a card without them goes
  // straight from queued to its final state.
  on_task(data) {
    const node = data.role === "primary" ? this.primary
      : data.role === "synthesis" ? this.answer : this.cards.get(data.task_id);
    if (!node || node.dataset.final) return;
    const where = data.replica ? ` on ${data.replica}` : "";
    if (data.role === "synthesis" && data.state === "running") {
      setState(node, "synthesizing", `synthesizing · ${data.expert}${where}`);
      return;
    }
    const state = data.hedged ? "hedged" : data.state;  // a copy of a slow first token
    setState(node, data.state, `${state} (attempt ${data.attempt}${where})`);
    if (data.state === "retrying" && data.reason) {
      (node.querySelector(".reason") || node.querySelector(".meta")).textContent = data.reason;
    }
  }

  on_primary({ expert, delta, attempt }) {
    const text = document.getElementById("primary-text");
    if (expert !== this.primaryExpert) {  // a fallback expert continues the same answer
      this.primary.querySelector(".meta").textContent =
        `${this.primaryExpert} failed; ${expert} continues the answer (attempt ${attempt}).`;
      this.primaryExpert = expert;
      this.primary.querySelector(".who").textContent = expert;
    }
    if (this.primary.dataset.state !== "streaming") setState(this.primary, "streaming");
    text.append(delta);
  }

  on_expert_delta({ task_id, delta }) {
    const card = this.cards.get(task_id);
    if (!card || card.dataset.final) return;
    if (card.dataset.state === "queued") setState(card, "running");
    card.querySelector(".text").append(delta);
  }

  on_expert({ result }) {
    const card = this.cards.get(result.task_id);
    if (!card) return;
    const [state, label] = FINAL[result.status] || [result.status, result.status];
    setState(card, state, label);
    card.dataset.final = "yes";
    card.querySelector(".meta").textContent = attemptsText(result);
    card.querySelector(".reason").textContent = result.error || "";
    card.querySelector(".text").textContent = result.result || "";
  }

  on_fusion_delta({ delta }) {
    if (this.answer.dataset.state !== "synthesizing") setState(this.answer, "synthesizing");
    document.getElementById("answer").append(delta);
  }

  on_fusion({ strategy, content, failed }) {
    document.getElementById("answer").textContent = content;
    const left = (failed || []).map((r) => `${r.expert} (${FINAL[r.status]?.[1] || r.status})`);
    this.answer.querySelector(".meta").textContent = `fusion: ${strategy}` +
      (left.length ? ` · left out: ${left.join(", ")}` : "");
    setState(this.answer, "fused");
  }

  on_done({ primary, experts, content, timings }) {
    for (const result of experts || []) {
      if (!this.cards.get(result.task_id)?.dataset.final) this.on_expert({ result });
    }
    if (primary) {
      const [state, label] = FINAL[primary.status] || [primary.status, primary.status];
      setState(this.primary, state, label);
      this.primary.querySelector(".meta").textContent = attemptsText(primary);
    }
    document.getElementById("answer").textContent = content ?? "";
    const times = Object.entries(timings || {}).map(([k, v]) => `${k} ${Chorus.seconds(v)}`);
    const meta = this.answer.querySelector(".meta");
    meta.textContent = [meta.textContent, times.join(" · ")].filter(Boolean).join(" · ");
    setState(this.answer, "done");
    this.finished = true;
  }

  on_error({ code, message, status }) {
    this.stop("failed", `${Chorus.describe(status, message).title}: ${message} (${code})`);
  }

  // The request ended without `done`: what never reported a result is marked stopped.
  stop(state, why) {
    for (const node of [this.primary, ...this.cards.values()]) {
      if (!node.dataset.final && !["done", "failed", "timeout"].includes(node.dataset.state)) {
        setState(node, "stopped");
      }
    }
    setState(this.answer, state, state);
    this.answer.querySelector(".meta").textContent = why;
    this.finished = true;
  }
}
