"use strict";
// Shared by both pages: the API key, calls to the API, SSE over fetch, errors in words.
// Every URL is relative: the page's <base href> carries any Serve route prefix.
const Chorus = (() => {
  const KEY = "chorus.apiKey";
  const waiting = [];  // calls parked until the user gives a key

  const apiKey = () => sessionStorage.getItem(KEY) || "";

  function keyPanel() {
    let panel = document.getElementById("key-panel");
    if (panel) return panel;
    panel = document.createElement("form");
    panel.id = "key-panel";
    panel.className = "notice key";
    panel.hidden = true;
    panel.innerHTML = `<p class="why"></p>
      <label>API key <input type="password" name="key" autocomplete="off" required></label>
      <button type="submit">Use this key</button>
      <small>Kept in this tab only (sessionStorage); sent as <code>Authorization: Bearer …</code>.</small>`;
    panel.addEventListener("submit", (event) => {
      event.preventDefault();
      const key = panel.elements.key.value.trim();
      if (!key) return;
      sessionStorage.setItem(KEY, key);
      panel.hidden = true;
      showKeyState();
      waiting.splice(0).forEach((resume) => resume());
    });
    document.querySelector("header").after(panel);
    return panel;
  }

  function askKey(why) {
    const panel = keyPanel();
    panel.querySelector(".why").textContent = why;
    if (panel.hidden) {
      panel.hidden = false;
      panel.elements.key.value = "";
      panel.elements.key.focus();
    }
    return new Promise((resume) => waiting.push(resume));
  }

  function showKeyState() {
    const button = document.getElementById("forget-key");
    if (!button) return;
    button.hidden = !apiKey();
    button.onclick = () => { sessionStorage.removeItem(KEY); showKeyState(); };
  }

  // fetch() with the key; a 401 asks the user for a key (once) and sends the call again.
  async function request(path, init = {}) {
    for (;;) {
      const headers = { ...(init.headers || {}) };
      if (apiKey()) headers.Authorization = `Bearer ${apiKey()}`;
      const response = await fetch(path, { ...init, headers });
      if (response.status !== 401) return response;
      const refused = apiKey();
      sessionStorage.removeItem(KEY);
      showKeyState();
      await askKey(refused ? "That API key was refused. Enter the right one:"
                           : "This Chorus server needs an API key:");
    }
  }

  async function json(path) {
    const response = await request(path);
    if (!response.ok) throw await problem(response);
    return response.json();
  }

  // An error response as {title, text, field}: what happened, in plain words.
  async function problem(response) {
    let error = {};
    try {
      error = (await response.json()).error || {};
    } catch {
      // Not our JSON (a proxy's error page, a cut connection): the status says enough.
    }
    return describe(response.status, error.message, error.param,
                    response.headers.get("Retry-After"));
  }

  function describe(status, message, field, retryAfter) {
    const detail = message || `HTTP ${status}`;
    if (status === 400 || status === 422) {
      return { title: field ? `Please check ${field}` : "The request is not valid",
               text: detail, field };
    }
    if (status === 404) return { title: "Not found", text: detail, field };
    if (status === 429) {
      const wait = retryAfter ? `${retryAfter} second${retryAfter === "1" ? "" : "s"}` : "a moment";
      return { title: "The team is busy", text: `Its queue is full. Try again in ${wait}.`,
               retryAfter: Number(retryAfter) || 1 };
    }
    if (status === 503) {
      return { title: "The team is unavailable",
               text: `${detail} — experts are down or restarting. Try again shortly.` };
    }
    if (status === 502 || status === 504) return { title: "No answer", text: detail };
    return { title: `Something went wrong (HTTP ${status})`, text: detail };
  }

  // Server-sent events from a fetch() response: yields {type, data} as blocks complete.
  async function* events(response) {
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value.replace(/\r\n?/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        let type = "message";
        const data = [];
        for (const line of block.split("\n")) {
          if (line.startsWith("event:")) type = line.slice(6).trim();
          else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
        }
        if (data.length) yield { type, data: JSON.parse(data.join("\n")) };
      }
    }
  }

  const seconds = (value) => (typeof value === "number" && isFinite(value)
    ? (value < 1 ? `${Math.round(value * 1000)} ms` : `${value.toFixed(2)} s`) : "–");

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  document.addEventListener("DOMContentLoaded", showKeyState);
  return { request, json, problem, describe, events, seconds, el, askKey, apiKey };
})();
