"""Real OpenAI clients against the served app: the `openai` SDK, LangChain, LiteLLM.

Serve runs once for the module (in-process `serve.run`) with the mock team; `code`
names vLLM's `hermes` tool parser, so `tool_choice: auto` goes through the parser path
with the mock writing a Hermes `<tool_call>` text (the bundled tiny model cannot call
tools on its own: see docs/openai.md). The mock is deterministic, so every expected
text and token count is computed from its documented rules.
"""

from __future__ import annotations

import json
import socket
from typing import Any

import httpx
import jsonschema
import pytest
import yaml
from pydantic import BaseModel

from actors.engines.base import GenerationRequest
from actors.engines.mock import count_tokens, mock_text
from orchestration.cli import iter_sse
from orchestration.generation import Message, chat_turns
from tests.conftest import config_dict, team_actor

pytestmark = pytest.mark.usefixtures("ray_session")
APP = "openai"
HELLO = [{"role": "user", "content": "hello"}]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
GENERAL_TOKENS = 32  # config/mock.yaml: general's mock answer length


@pytest.fixture(scope="module")
def url(tmp_path_factory) -> str:
    from ray import serve

    from serve_app import build_app

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    data = config_dict("mock")
    for expert in data["experts"]:
        expert["mock"].update(ttft_s=0.0, token_latency_s=0.002)
        if expert["name"] == "code":
            expert["tool_parser"] = "hermes"
    path = tmp_path_factory.mktemp("openai") / "openai.yaml"
    path.write_text(yaml.safe_dump(data))
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"config": str(path)}), name=APP, route_prefix=f"/{APP}")
    yield f"http://127.0.0.1:{port}/{APP}"
    serve.delete(APP)
    serve.shutdown()


@pytest.fixture(scope="module")
def client(url: str) -> Any:
    import openai

    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def general_text(choice: int = 0, prompt: str = "hello", tokens: int = GENERAL_TOKENS) -> str:
    return "".join(mock_text("general", prompt, choice, tokens))


def general_prompt_tokens(messages: list[dict[str, str]]) -> int:
    system = config_dict("mock")["experts"][0]["system_prompt"]
    turns = chat_turns(system, [Message(**m) for m in messages])
    return count_tokens(GenerationRequest(request_id="x", messages=turns))


# --------------------------------------------------------------------------- the SDK


def test_sdk_usage_is_the_engines_count_streamed_or_not(client: Any) -> None:
    whole = client.chat.completions.create(model="general", messages=HELLO)
    assert whole.choices[0].message.content == general_text()
    assert whole.choices[0].finish_reason == "stop"
    prompt = general_prompt_tokens(HELLO)
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (prompt, GENERAL_TOKENS)
    chunks = list(client.chat.completions.create(model="general", messages=HELLO, stream=True,
                                                 stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == general_text()
    assert chunks[-1].usage.model_dump(include={"prompt_tokens", "completion_tokens"}) == {
        "prompt_tokens": prompt, "completion_tokens": GENERAL_TOKENS}


def test_sdk_a_conversation_reaches_the_engine_as_turns(client: Any) -> None:
    turns = [{"role": "system", "content": "Be terse."},
             {"role": "user", "content": "My name is Ada."},
             {"role": "assistant", "content": "Hello Ada!"},
             {"role": "user", "content": "What is my name?"}]
    reply = client.chat.completions.create(model="general", messages=turns)
    # Every turn is counted (the mock counts words of each turn it received), and the
    # mock samples from the conversation, not from one flattened message.
    assert reply.usage.prompt_tokens == general_prompt_tokens(turns)
    key = "My name is Ada.\nHello Ada!\nWhat is my name?"
    assert reply.choices[0].message.content == general_text(prompt=key)


def test_sdk_max_tokens_ends_with_length(client: Any) -> None:
    for field in ("max_tokens", "max_completion_tokens"):
        reply = client.chat.completions.create(model="general", messages=HELLO, **{field: 3})
        assert reply.choices[0].finish_reason == "length"
        assert reply.choices[0].message.content == general_text(tokens=3)
        assert reply.usage.completion_tokens == 3


def test_sdk_stop_cuts_the_text(client: Any) -> None:
    full = general_text()
    stop = f" {full.split()[6]}"
    reply = client.chat.completions.create(model="general", messages=HELLO, stop=[stop, "zzz"])
    assert reply.choices[0].message.content == full[: full.index(stop)]
    assert reply.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(model="general", messages=HELLO, stop=stop,
                                              stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == (
        full[: full.index(stop)])


def test_sdk_n_gives_n_choices_streamed_or_not(client: Any) -> None:
    reply = client.chat.completions.create(model="general", messages=HELLO, n=2, max_tokens=6)
    assert [c.index for c in reply.choices] == [0, 1]
    assert [c.message.content for c in reply.choices] == [general_text(0, tokens=6),
                                                          general_text(1, tokens=6)]
    assert reply.usage.completion_tokens == 12
    texts: dict[int, str] = {}
    ends: dict[int, str] = {}
    for chunk in client.chat.completions.create(model="general", messages=HELLO, n=2,
                                                max_tokens=6, stream=True):
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            if choice.finish_reason:
                ends[choice.index] = choice.finish_reason
    assert texts == {0: general_text(0, tokens=6), 1: general_text(1, tokens=6)}
    assert ends == {0: "length", 1: "length"}


def test_sdk_logprobs_when_asked(client: Any) -> None:
    reply = client.chat.completions.create(model="general", messages=HELLO, max_tokens=5,
                                           logprobs=True, top_logprobs=2)
    content = reply.choices[0].logprobs.content
    assert "".join(t.token for t in content) == reply.choices[0].message.content
    assert len(content) == 5 and all(len(t.top_logprobs) == 2 and t.logprob < 0 for t in content)
    assert client.chat.completions.create(model="general", messages=HELLO,
                                          max_tokens=5).choices[0].logprobs is None
    streamed = [c for c in client.chat.completions.create(
        model="general", messages=HELLO, max_tokens=5, logprobs=True, stream=True) if c.choices]
    tokens = [t.token for c in streamed if c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert "".join(tokens) == reply.choices[0].message.content


def test_sdk_response_format_json_schema_and_json_object(client: Any) -> None:
    schema = {"type": "object", "properties": {"name": {"type": "string"},
                                               "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}
    reply = client.chat.completions.create(
        model="general", messages=HELLO,
        response_format={"type": "json_schema",
                         "json_schema": {"name": "person", "schema": schema, "strict": True}})
    jsonschema.validate(json.loads(reply.choices[0].message.content), schema)
    reply = client.chat.completions.create(model="chorus", messages=[
        {"role": "user", "content": "Review this python code"}],
        response_format={"type": "json_object"})
    assert isinstance(json.loads(reply.choices[0].message.content), dict)  # nothing appended
    assert [u["role"] for u in reply.model_extra["usage_by_expert"]] == ["primary"]


def test_sdk_tool_calls_through_the_experts_parser_streamed_or_not(client: Any) -> None:
    reply = client.chat.completions.create(model="code", messages=HELLO, tools=[WEATHER])
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {
        "city": "chorus"}
    calls: dict[int, dict[str, str]] = {}
    finish = None
    for chunk in client.chat.completions.create(model="code", messages=HELLO, tools=[WEATHER],
                                                stream=True):
        for part in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            entry = calls.setdefault(part.index, {"name": "", "arguments": ""})
            entry["name"] += part.function.name or ""
            entry["arguments"] += part.function.arguments or ""
        finish = (chunk.choices[0].finish_reason if chunk.choices else None) or finish
    assert calls == {0: {"name": "get_weather", "arguments": call.function.arguments}}
    assert finish == "tool_calls"


def test_sdk_forced_tool_choice_needs_no_parser_and_auto_without_one_is_refused(client) -> None:
    import openai

    forced = client.chat.completions.create(
        model="general", messages=HELLO, tools=[WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert forced.choices[0].message.tool_calls[0].function.name == "get_weather"
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="general", messages=HELLO, tools=[WEATHER])
    assert caught.value.body["param"] == "tool_choice"
    assert caught.value.body["code"] == "unsupported_parameter"


def test_sdk_model_chorus_counts_the_primary_and_lists_every_expert(client: Any) -> None:
    messages = [{"role": "user", "content": "Review this Python function for a bug"}]
    reply = client.chat.completions.create(model="chorus", messages=messages, n=2, max_tokens=4)
    by_expert = reply.model_extra["usage_by_expert"]
    primary = by_expert[0]
    assert primary["role"] == "primary" and len(by_expert) >= 2
    assert {u["role"] for u in by_expert[1:]} == {"expert"}
    assert reply.usage.completion_tokens == primary["completion_tokens"] == 8  # 2 choices x 4
    assert reply.usage.prompt_tokens == primary["prompt_tokens"] > 0
    assert all("Expert contributions" in c.message.content for c in reply.choices)
    assert reply.choices[0].message.content != reply.choices[1].message.content


def _last_priority(expert: str) -> int:
    import ray

    actor = team_actor(f"chorus-{APP}", f"{expert}#0")
    return ray.get(actor.history.remote())[-1][1]


def test_priority_as_extra_body_or_header(client: Any) -> None:
    asks = [({"extra_body": {"priority": "high"}}, 30), ({"extra_body": {"priority": -1}}, 30),
            ({"extra_headers": {"X-Chorus-Priority": "low"}}, -10),
            ({"extra_body": {"priority": 5}}, -10), ({}, 10)]
    for options, seen in asks:  # primary task priority 10, shifted +20 / -20
        client.chat.completions.create(model="general", messages=HELLO, max_tokens=2, **options)
        assert _last_priority("general") == seen, options


REFUSED = [({"extra_body": {"top_k": 4}}, "top_k", 400),
           ({"extra_body": {"audio": {"voice": "alloy", "format": "wav"}}}, "audio", 400),
           ({"extra_body": {"reasoning_effort": "high"}}, "reasoning_effort", 400),
           ({"messages": [{"role": "user", "content": [
               {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]},
            "messages[0].content[0].type", 400),
           ({"n": 9}, "n", 422), ({"top_logprobs": 3}, "top_logprobs", 422),
           ({"extra_body": {"priority": "urgent"}}, "priority", 422),
           ({"stop": ["a", "b", "c", "d", "e"]}, "stop", 422)]


@pytest.mark.parametrize(("options", "param", "status"), REFUSED, ids=[r[1] for r in REFUSED])
def test_sdk_refusals_name_the_field(client: Any, options: dict, param: str, status: int) -> None:
    import openai

    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(**{"model": "general", "messages": HELLO, **options})
    assert caught.value.status_code == status
    assert caught.value.body["param"] == param and caught.value.body["message"].startswith(param)


def test_sdk_legacy_completions_streamed_or_not(client: Any) -> None:
    import openai

    whole = client.completions.create(model="general", prompt="Once upon", max_tokens=4,
                                      logprobs=1)
    text = "".join(mock_text("general", "Once upon", 0, 4))
    assert whole.choices[0].text == text and whole.choices[0].finish_reason == "length"
    assert whole.choices[0].logprobs.tokens and "".join(whole.choices[0].logprobs.tokens) == text
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (2, 4)
    streamed = list(client.completions.create(model="general", prompt="Once upon", max_tokens=4,
                                              stream=True))
    assert "".join(c.choices[0].text for c in streamed if c.choices) == text
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="general", prompt="x", echo=True)
    assert caught.value.body["param"] == "echo"


STOP = ["the"]  # the mock's "the" and "therefore" start a word: a cut text ends in " "
STORY = "tell me a story about a dragon"  # general's answer has a "the"


def test_stop_leaves_trailing_whitespace_and_the_stream_joins_to_the_whole_answer(
        client: Any, url: str) -> None:
    # OpenAI and vLLM never trim a completion: streamed or not, the text is the same.
    legacy = {"model": "general", "prompt": "Once upon", "max_tokens": 32, "stop": STOP}
    whole = client.completions.create(**legacy).choices[0].text
    full = "".join(mock_text("general", "Once upon", 0, 32))
    assert whole == full[: full.index("the")] and whole.endswith(" ")
    streamed = client.completions.create(**legacy, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == whole

    for model, prompt in [("general", STORY), ("chorus", STORY),
                          ("chorus", "Review this Python function for a bug")]:
        ask = {"model": model, "messages": [{"role": "user", "content": prompt}], "stop": STOP}
        whole = client.chat.completions.create(**ask).choices[0].message.content
        streamed = client.chat.completions.create(**ask, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == whole
        if prompt == STORY:  # the primary alone
            full = general_text(prompt=STORY)
            assert whole == full[: full.index("the")]
            assert whole.endswith(" ")
        else:  # the primary's cut text, untrimmed, then the experts' section
            assert " \n\n---\nExpert contributions:" in whole

    body = {"prompt": STORY, "primary": "general", "sampling": {"stop": STOP}}
    with httpx.stream("POST", f"{url}/v1/orchestrate", json=body, timeout=60) as response:
        events = list(iter_sse(response.iter_lines()))
    deltas = "".join(data["delta"] for kind, data in events if kind == "primary")
    assert deltas.endswith(" ") and events[-1][0] == "done"
    assert events[-1][1]["content"] == deltas == events[-1][1]["primary"]["result"]
    whole = httpx.post(f"{url}/v1/orchestrate", json={**body, "stream": False}, timeout=60)
    assert whole.json()["content"] == deltas


# --------------------------------------------------------------------------- LangChain, LiteLLM


class Person(BaseModel):
    name: str
    age: int


def test_langchain_invoke_stream_and_structured_output(url: str) -> None:
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=f"{url}/v1", api_key="unused", model="general", max_retries=0)
    answer = llm.invoke("hello")
    assert answer.content == general_text()
    assert answer.usage_metadata["output_tokens"] == GENERAL_TOKENS
    assert "".join(chunk.content for chunk in llm.stream("hello")) == general_text()
    person = llm.with_structured_output(Person).invoke("Invent a person")
    assert isinstance(person, Person)
    team = ChatOpenAI(base_url=f"{url}/v1", api_key="unused", model="chorus", max_retries=0)
    assert "Expert contributions" in team.invoke("Review this Python function for a bug").content


def test_litellm_completion_streamed_or_not(url: str) -> None:
    import litellm

    options = {"model": "openai/chorus", "api_base": f"{url}/v1", "api_key": "unused",
               "messages": [{"role": "user", "content": "hello"}], "max_tokens": 5}
    whole = litellm.completion(**options)
    assert whole.choices[0].message.content == general_text(tokens=5)
    assert whole.usage.completion_tokens == 5 and whole.choices[0].finish_reason == "length"
    chunks = list(litellm.completion(**options, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == general_text(tokens=5)


def test_completions_route_errors_have_the_documented_shape(url: str) -> None:
    response = httpx.post(f"{url}/v1/completions", json={"model": "gpt-9", "prompt": "x"},
                          timeout=30)
    assert response.status_code == 404 and response.json()["error"]["param"] == "model"
