"""The pages in a real browser: Debian's headless Chromium, driven by Playwright.

Serve starts once for the module: `serve run serve_app:app` (the default mock team,
fixture `base_url`) and, in-process, app `chaos` at `/chaos`: config/chaos.yaml with an
API key and a critic that fails every call. Screenshots go to `$CHORUS_SCREENSHOTS`, or
to a temporary folder; the test never writes into the repository.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from orchestration.cli import iter_sse
from tests.conftest import config_dict

pytestmark = [pytest.mark.usefixtures("ray_session"), pytest.mark.browser]
KEY = "chaos-key-7"
WAIT_MS = 60_000  # an upper bound for a loaded machine; the checks poll, they never sleep
FINAL_STATES = {"done", "failed", "timeout", "cancelled"}
# Chromium without a window, a GPU, a sandbox (we are root) or any call home.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    executable = os.environ.get("CHORUS_CHROMIUM") or shutil.which("chromium")
    if not executable:
        pytest.fail("Debian's `chromium` is not installed: run `make install-test`")
    with sync_playwright() as playwright:
        # Playwright gives the browser a fresh, temporary profile.
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    from playwright.sync_api import expect

    expect.set_options(timeout=WAIT_MS)
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    yield page
    page.unroute_all(behavior="ignoreErrors")  # a relay still in flight must not fail it
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("CHORUS_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def chaos_url(base_url, serve_port: int, tmp_path_factory) -> Iterator[str]:
    # After `base_url`, so removed before it: `serve run` shuts Serve down when it stops.
    from ray import serve

    from serve_app import build_app

    data = config_dict("chaos")
    for expert in data["experts"]:
        if expert["name"] == "critic":  # a new dict: the YAML anchor shares one between experts
            expert["mock"] = {**expert["mock"], "fail_every": 1}
        if expert["name"] == "math":  # breaks off after 4 tokens; general continues it
            expert["fallback"] = "general"
            expert["mock"] = {**expert["mock"], "fail_every": 1, "fault_after_tokens": 4,
                              "slow_every": 0}
    data.setdefault("server", {})["api_key"] = KEY
    path = tmp_path_factory.mktemp("cfg") / "chaos.yaml"
    path.write_text(yaml.safe_dump(data))
    serve.run(build_app({"config": str(path)}), name="chaos", route_prefix="/chaos")
    yield f"http://127.0.0.1:{serve_port}/chaos"
    serve.delete("chaos")


def _shot(page, shots: Path, name: str) -> None:
    path = shots / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 10_000  # a rendered page, not an empty canvas


def _ready(page, url: str) -> None:
    """Open the playground and wait until its options came from the server."""
    from playwright.sync_api import expect

    page.goto(f"{url}/")
    expect(page.locator("#expert-choices input")).to_have_count(4)


# --------------------------------------------------------------------------- playground


def test_playground_streams_the_plan_the_primary_the_cards_and_the_answer(
        base_url, page, shots: Path) -> None:
    from playwright.sync_api import expect

    url, _ = base_url
    _ready(page, url)
    page.fill("#prompt", "Review this Python code for a bug")
    # Every length the primary's text goes through, and every state each card goes
    # through, recorded in the page as the DOM changes.
    page.evaluate("""() => {
      const node = document.getElementById('primary-text');
      window.lengths = [];
      new MutationObserver(() => window.lengths.push(node.textContent.length))
        .observe(node, {childList: true, characterData: true, subtree: true});
      window.paths = {};
      new MutationObserver((records) => records.forEach((r) => {
        const path = window.paths[r.target.dataset.task] ??= [r.oldValue];
        path.push(r.target.dataset.state);
      })).observe(document.getElementById('cards'),
                  {attributes: true, attributeFilter: ['data-state'], attributeOldValue: true,
                   subtree: true});
    }""")
    with page.expect_response(lambda r: r.url.endswith("/v1/orchestrate")) as sent:
        page.click("#send")
    expect(page.locator("#answer-panel")).to_have_attribute("data-state", "done")
    events = list(iter_sse(sent.value.text().splitlines()))
    plan, done = events[0][1]["plan"], events[-1][1]
    assert events[-1][0] == "done"

    assert page.inner_text("#plan-strategy").startswith(plan["strategy"])
    assert page.inner_text("#plan-reason") == plan["reason"] and plan["reason"]
    asked = page.locator("#plan-asked .chip").all_inner_texts()
    assert asked == [f"{plan['primary']['expert']} (primary)",
                     *(task["expert"] for task in plan["experts"])]

    primary = "".join(data["delta"] for kind, data in events if kind == "primary")
    assert page.inner_text("#primary-text") == primary == done["primary"]["result"]
    lengths = page.evaluate("window.lengths")
    growing = sorted({n for n in lengths if 0 < n < len(primary)})
    # Streamed: some text showed before the whole (how many steps depends on the machine's
    # speed: the stream merges what piles up), and it only ever grew.
    assert growing and lengths == sorted(lengths), lengths

    results = {data["result"]["task_id"]: data["result"] for kind, data in events
               if kind == "expert"}
    assert {task["id"] for task in plan["experts"]} == set(results) and results
    paths = page.evaluate("window.paths")
    for task_id, result in results.items():
        # queued -> running (a `task` event) -> ... -> its final state
        assert paths[task_id][:2] == ["queued", "running"], paths[task_id]
        card = page.locator(f".card[data-task='{task_id}']")
        assert card.get_attribute("data-state") in FINAL_STATES
        assert card.get_attribute("data-state") == ("done" if result["status"] == "success"
                                                    else result["status"])
        assert card.locator(".text").inner_text() == (result["result"] or "")
        expect(card.locator(".meta")).to_contain_text(f"{result['attempts']} attempt")
        expect(card.locator(".meta")).to_contain_text(f"served by {' → '.join(result['replicas'])}")

    assert page.eval_on_selector("#answer", "n => n.textContent") == done["content"]
    assert "Expert contributions" in done["content"]
    _shot(page, shots, "playground")


def test_specialists_stream_in_their_cards_when_asked(base_url, page) -> None:
    from playwright.sync_api import expect

    url, _ = base_url
    _ready(page, url)
    expect(page.locator("#stream-experts-option")).to_be_visible()  # the server accepts it
    page.fill("#prompt", "Review this Python code for a bug")
    page.check("#stream_experts")
    page.evaluate("""() => {
      window.seen = {};
      new MutationObserver((records) => records.forEach((r) => {
        const card = r.target.parentElement?.closest?.('.card')
                     || r.target.closest?.('.card');
        if (card) (window.seen[card.dataset.expert] ??= []).push(
          card.querySelector('.text').textContent.length);
      })).observe(document.getElementById('cards'),
                  {childList: true, characterData: true, subtree: true});
    }""")
    with page.expect_request("**/v1/orchestrate") as sent:
        page.click("#send")
    assert sent.value.post_data_json["stream_experts"] is True
    expect(page.locator("#answer-panel")).to_have_attribute("data-state", "done")
    seen = page.evaluate("window.seen")
    experts = page.locator(".card").evaluate_all("(cards) => cards.map((c) => c.dataset.expert)")
    assert experts  # the plan asked at least one specialist
    for expert in experts:
        final = len(page.locator(f".card[data-expert={expert}] .text").inner_text())
        partial = {n for n in seen[expert] if 0 < n < final}
        assert partial and final, (expert, seen[expert])  # text arrived before the result


@pytest.mark.parametrize(("field", "value", "said"), [
    ("max_tokens", "100000", "above the limit of 4096"),
    ("prompt", "   ", "must not be empty"),
])
def test_bad_input_names_the_field_in_plain_words(base_url, page, field: str, value: str,
                                                  said: str) -> None:
    from playwright.sync_api import expect

    url, _ = base_url
    _ready(page, url)
    page.fill("#prompt", "hello")
    page.fill(f"#{field}", value)
    page.click("#send")
    notice = page.locator("#notice")
    expect(notice).to_be_visible()
    expect(notice).to_contain_text(f"Please check {field}")
    expect(notice).to_contain_text(said)
    assert "{" not in notice.inner_text()  # words, not JSON
    expect(page.locator(f"#{field}")).to_have_attribute("aria-invalid", "true")
    expect(page.locator("#run")).to_be_hidden()


@pytest.mark.parametrize(("status", "headers", "error", "words"), [
    (429, {"Retry-After": "3"}, {"code": "queue_full", "message": "executor queue is full"},
     "The team is busy. Its queue is full. Try again in 3 seconds."),
    (503, {"Retry-After": "5"}, {"code": "no_healthy_expert", "message": "no expert answers"},
     "The team is unavailable. no expert answers — experts are down or restarting."),
])
def test_refusals_read_as_words(base_url, page, status: int, headers: dict, error: dict,
                                words: str) -> None:
    """README "HTTP errors": the documented 429 and 503 answers, as the page shows them."""
    from playwright.sync_api import expect

    url, _ = base_url
    body = {"error": {"type": "x", "param": None, **error}}
    page.route("**/v1/orchestrate",
               lambda route: route.fulfill(status=status, headers=headers, json=body))
    _ready(page, url)
    page.fill("#prompt", "hello")
    page.click("#send")
    expect(page.locator("#notice")).to_contain_text(words)
    if status == 429:  # the button waits out Retry-After, then comes back
        expect(page.locator("#send")).to_be_disabled()
        expect(page.locator("#send")).to_be_enabled()


def test_chaos_failed_card_shows_reason_and_attempts_behind_the_api_key(
        chaos_url, page, shots: Path) -> None:
    from playwright.sync_api import expect

    page.goto(f"{chaos_url}/")
    key = page.locator("#key-panel")
    expect(key).to_contain_text("needs an API key")
    key.locator("input").fill(KEY)
    key.locator("button").click()
    expect(key).to_be_hidden()
    expect(page.locator("#expert-choices input")).to_have_count(4)
    page.fill("#prompt", "check this answer")
    page.uncheck("#experts-auto")
    page.check("#expert-choices input[value=critic]")
    page.click("#send")
    expect(page.locator("#answer-panel")).to_have_attribute("data-state", "done")
    card = page.locator(".card[data-expert=critic]")
    expect(card).to_have_attribute("data-state", "failed")
    expect(card.locator(".state")).to_have_text("failed")
    expect(card.locator(".reason")).to_contain_text("Simulated GPU error: CUDA kernel overload")
    expect(card.locator(".meta")).to_contain_text("3 attempts")
    expect(card.locator(".meta")).to_contain_text("served by critic#0 → critic#0 → critic#0")
    expect(page.locator("#answer-panel .meta")).to_contain_text("left out: critic (failed)")
    _shot(page, shots, "playground-chaos")

    page.click("text=Operations")  # the same tab keeps the key
    expect(page.locator("#tile-failures .value")).to_have_text("1")
    expect(page.locator("#tile-retries .value")).to_have_text("2")
    expect(key).to_be_hidden()


def test_a_fallback_continues_the_answer_on_the_page(chaos_url, page) -> None:
    from playwright.sync_api import expect

    page.goto(f"{chaos_url}/")
    page.locator("#key-panel input").fill(KEY)
    page.locator("#key-panel button").click()
    expect(page.locator("#expert-choices input")).to_have_count(4)
    page.fill("#prompt", "calculate the sum")
    page.select_option("#primary", "math")
    page.uncheck("#experts-auto")
    with page.expect_response(lambda r: r.url.endswith("/v1/orchestrate")) as sent:
        page.click("#send")
    expect(page.locator("#answer-panel")).to_have_attribute("data-state", "done")
    events = list(iter_sse(sent.value.text().splitlines()))
    kind, done = events[-1]
    assert kind == "done" and done["primary"]["served_by"][-1] == "general"
    text = page.inner_text("#primary-text")
    assert text == done["primary"]["result"]  # one answer: math's start, general's rest
    assert text.startswith("[math]") and "[general]" not in text
    expect(page.locator("#primary-panel .who")).to_have_text("general")
    cuts = [str(n) for n in done["primary"]["continued_from"] if n]
    expect(page.locator("#primary-panel .meta")).to_contain_text(
        f"continued at {', '.join(cuts)} chars")


# --------------------------------------------------------------------------- operations


@contextlib.contextmanager
def _burst(url: str, workers: int = 12) -> Iterator[list[int]]:
    """Requests from `workers` threads, back to back, until the block ends."""
    stop, statuses = threading.Event(), []

    def loop() -> None:
        with httpx.Client(timeout=120) as http:
            while not stop.is_set():
                with http.stream("POST", f"{url}/v1/orchestrate",
                                 json={"prompt": "review this python code"}) as response:
                    response.read()  # streamed, as the playground asks: TTFT is measured
                statuses.append(response.status_code)

    threads = [threading.Thread(target=loop, daemon=True) for _ in range(workers)]
    for thread in threads:
        thread.start()
    try:
        yield statuses
    finally:
        stop.set()
        for thread in threads:
            thread.join(120)


def test_ops_view_shows_in_flight_during_a_burst_and_zero_after(
        base_url, page, shots: Path) -> None:
    from playwright.sync_api import expect

    url, _ = base_url
    answers: list[dict] = []  # every /v1/stats answer the page got, in order (one per refresh)

    def relay(route) -> None:
        response = route.fetch()
        answers.append(response.json())
        route.fulfill(response=response)

    page.route("**/v1/stats", relay)
    page.goto(f"{url}/ops")
    in_flight = page.locator("#tile-in-flight .value")
    expect(in_flight).to_have_text("0")
    expect(page.locator("#experts tr.expert")).to_have_count(4)
    with _burst(url) as statuses:
        shown = page.wait_for_function("""() => {
          const n = (node) => Number(node.textContent);
          const cells = (kind) => Object.fromEntries(
            [...document.querySelectorAll(`#experts tr.${kind}`)]
              .map((row) => [row.dataset.name, n(row.querySelector('td.inFlight'))]));
          const total = n(document.querySelector('#tile-in-flight .value'));
          const experts = cells('expert');
          return total > 0 && Object.values(experts).some((v) => v > 0) && {
            refresh: Number(document.body.dataset.refreshes), total, experts,
            replicas: cells('replica')};
        }""", timeout=WAIT_MS).json_value()
        # What the page showed is exactly what that refresh's /v1/stats answer said.
        executor = answers[shown["refresh"] - 1]["executor"]
        assert shown["total"] == executor["active"]
        assert shown["experts"] == {name: executor["in_flight_per_expert"].get(name, 0)
                                    for name in ("general", "code", "math", "critic")}
        assert shown["replicas"] == {label: replica["in_flight"]
                                     for pool in executor["replicas"].values()
                                     for label, replica in pool.items()}
        expect(page.locator("#tile-rate .value")).not_to_have_text("0")
        expect(page.locator("#tile-latency .value")).to_have_text(re.compile(r"\d+ (ms|s)"))
        expect(page.locator("#tile-ttft .value")).to_have_text(re.compile(r"\d+ (ms|s)"))
        # It keeps refreshing under load (and the chart gets a few seconds of it to show).
        page.wait_for_function("(n) => Number(document.body.dataset.refreshes) >= n",
                               arg=int(page.get_attribute("body", "data-refreshes")) + 5,
                               timeout=WAIT_MS)
        _shot(page, shots, "ops")
    assert statuses and set(statuses) == {200}
    expect(in_flight).to_have_text("0")
    expect(page.locator("#tile-queued .value")).to_have_text("0")
    expect(page.locator("#experts tr.replica")).to_have_count(4)  # one replica per expert
    expect(page.locator("#experts td.inFlight")).to_have_text(["0"] * 8)
    # No tenants configured: every caller is `default`, and its requests are counted.
    expect(page.locator('#tenants tr[data-name="default"] td.requests')).to_have_text(
        re.compile(r"^[1-9]\d*$"))


def test_ops_view_reads_a_stats_answer_with_fields_missing(base_url, page) -> None:
    """`/v1/stats` changes shape over time: what is absent shows as "–", nothing breaks."""
    from playwright.sync_api import expect

    url, _ = base_url
    page.route("**/v1/stats", lambda route: route.fulfill(status=200, json={
        "executor": {"active": 2}, "experts": {"general": {"error": "restarting"}}}))
    page.goto(f"{url}/ops")
    expect(page.locator("#tile-in-flight .value")).to_have_text("2")
    for tile in ("queued", "rate", "latency", "retries", "restarts"):
        expect(page.locator(f"#tile-{tile} .value")).to_have_text("–")
    row = page.locator("#experts tr.expert td")
    expect(row.nth(0)).to_have_text("general")
    expect(row.nth(1)).to_have_text("down: restarting")



def test_page_routes_and_their_data_on_the_real_app(base_url) -> None:
    url, _ = base_url
    assert httpx.get(f"{url}/", timeout=30).headers["content-type"].startswith("text/html")
    for path in ("/static/missing.js", "/static/..%2Fweb.py", "/nope"):
        response = httpx.get(f"{url}{path}", timeout=30)
        assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"
    options = httpx.get(f"{url}/v1/options", timeout=30).json()
    models = {m["id"] for m in httpx.get(f"{url}/v1/models", timeout=30).json()["data"]}
    assert {e["name"] for e in options["experts"]} == models - {"chorus"}
    assert options["auth"] is False and options["primary"] == "general"
    requests = httpx.get(f"{url}/v1/stats", timeout=30).json()["requests"]
    assert {"rate_per_s", "ttft_s", "latency_s", "outcomes", "series"} <= set(requests)
    assert len(requests["series"]["ended"]) == requests["window_s"]
