"use strict";
// The playground's form: options from GET v1/models and v1/options, a POST to
// v1/orchestrate on send, its events handed to a Run (run.js), errors in plain words.
const $ = (id) => document.getElementById(id);
let controller = null;  // aborts the request in flight (Stop): the server cancels its tasks

function option(select, value, label = value) {
  const node = document.createElement("option");
  node.value = value;
  node.textContent = label;
  select.append(node);
}

async function loadOptions() {
  const [models, options] = await Promise.all([Chorus.json("v1/models"),
                                               Chorus.json("v1/options")]);
  const about = new Map(options.experts.map((e) => [e.name, e]));
  // Experts are the models other than the team itself (README "OpenAI-compatible").
  const experts = models.data.map((m) => m.id).filter((id) => about.has(id));
  for (const name of experts) {
    option($("primary"), name, name === options.primary ? `${name} (default)` : name);
    const label = document.createElement("label");
    label.title = about.get(name).description || "";
    const box = document.createElement("input");
    box.type = "checkbox";
    box.value = name;
    box.disabled = true;
    label.append(box, ` ${name}`);
    $("expert-choices").append(label, " ");
  }
  for (const name of options.strategies) {
    option($("strategy"), name, name === options.default_strategy ? `${name} (default)` : name);
  }
  for (const name of options.priorities) option($("priority"), name);
  $("priority").value = "normal";
  $("max_tokens").placeholder = options.max_tokens.default;
  $("max_tokens").max = options.max_tokens.limit;
  $("max_tokens").title = `1 to ${options.max_tokens.limit}`;
  $("temperature").placeholder = options.temperature.default;
  $("stream-experts-option").hidden = !options.stream_experts;
  if (options.auth && !Chorus.apiKey()) {
    Chorus.askKey("This Chorus server needs an API key:");  // sending waits for it
  }
}

function requestBody() {
  const body = { prompt: $("prompt").value };
  for (const id of ["primary", "strategy", "priority"]) {
    if ($(id).value) body[id] = $(id).value;
  }
  for (const id of ["max_tokens", "temperature"]) {
    // A number input's value is "" when what was typed is not a number: send it as
    // typed, so the server's 422 names the field instead of the field being dropped.
    const input = $(id);
    if (input.value !== "") body[id] = Number(input.value);
    else if (input.validity.badInput) body[id] = "not a number";
  }
  if (!$("experts-auto").checked) {
    body.experts = [...document.querySelectorAll("#expert-choices input:checked")]
      .map((box) => box.value);
  }
  if ($("stream_experts").checked) body.stream_experts = true;
  return body;
}

function notice(problem) {
  const box = $("notice");
  document.querySelectorAll("[aria-invalid]").forEach((n) => n.removeAttribute("aria-invalid"));
  box.hidden = !problem;
  if (!problem) return;
  box.querySelector(".title").textContent = `${problem.title}.`;
  box.querySelector(".detail").textContent = problem.text;
  const field = problem.field && $(problem.field.split(/[[.]/)[0]);
  if (field) {
    field.setAttribute("aria-invalid", "true");
    field.focus();
  }
}

function busy(on) {
  $("send").disabled = on;
  $("stop").hidden = !on;
}

async function send(event) {
  event.preventDefault();
  notice(null);
  const run = new Run($("run"));  // the previous answer goes away at once
  busy(true);
  controller = new AbortController();
  const started = performance.now();
  const status = $("status");
  status.textContent = "sending…";
  let hold = 0;
  try {
    const response = await Chorus.request("v1/orchestrate", {
      method: "POST", signal: controller.signal,
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(requestBody()),
    });
    if (!response.ok) {
      const problem = await Chorus.problem(response);
      notice(problem);
      status.textContent = "";
      hold = problem.retryAfter || 0;
      return;
    }
    const rid = response.headers.get("X-Request-ID") || "";
    for await (const { type, data } of Chorus.events(response)) {
      run.handle(type, data);
      status.textContent = `${rid} · ${type} · ${Chorus.seconds((performance.now() - started) / 1000)}`;
      if (type === "error") notice(Chorus.describe(data.status, `${data.message} (${data.code})`));
    }
    if (!run.finished) run.stop("stopped", "The connection ended before the answer did.");
  } catch (error) {
    // Stop (AbortError) or a broken connection: the run ends "stopped", never half-done.
    const stopped = error.name === "AbortError";
    if (!run.finished) run.stop("stopped", stopped ? "Stopped by you." : String(error));
    if (!stopped) notice({ title: "Cannot reach Chorus", text: String(error) });
    status.textContent = stopped ? "stopped" : "";
  } finally {
    busy(false);
    controller = null;
    if (hold) {  // after a 429 the send button waits out Retry-After
      $("send").disabled = true;
      setTimeout(() => { $("send").disabled = Boolean(controller); }, hold * 1000);
    }
  }
}

$("ask").addEventListener("submit", send);
$("stop").addEventListener("click", () => controller?.abort());
$("experts-auto").addEventListener("change", (event) => {
  for (const box of document.querySelectorAll("#expert-choices input")) {
    box.disabled = event.target.checked;
  }
});
$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) $("ask").requestSubmit();
});
// Without options the form still sends (router's choices); the notice says what failed.
loadOptions().catch((problem) => notice(problem.title ? problem
  : { title: "Cannot load the team's options", text: String(problem) }));
