"""The OpenAI API without Ray: translation, refusals, the conversation rule, tool calls,
structured output, the mock's honouring of sampling, and the answers' shape."""

from __future__ import annotations

import importlib.util
import json
from typing import Any

import jsonschema
import pytest

from actors.engines import tool_calls
from actors.engines.base import GenerationRequest
from actors.engines.mock import MockEngine, count_tokens, mock_text
from orchestration.config import MockOptions
from orchestration.errors import BadRequestError, UnsupportedParameterError
from orchestration.generation import Message, Sample, Sampling, chat_turns
from orchestration.models import DoneEvent, OrchestrateRequest, TaskResult, TaskStatus
from orchestration.openai_compat import (
    ChatCompletionRequest,
    CompletionRequest,
    request_priority,
    to_orchestrate,
)
from orchestration.openai_output import Shape, choices, legacy_logprobs, stream, usage
from orchestration.routing import plan_request
from orchestration.tools import calls_from_forced, example_instance, forced_schema
from tests.conftest import make_config

EXPERTS = ["general", "code", "math", "critic"]
USER = [{"role": "user", "content": "hi"}]
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def chat(**fields: Any) -> OrchestrateRequest:
    body = ChatCompletionRequest.parse({"model": "general", "messages": USER, **fields})
    return to_orchestrate(body, EXPERTS, "req-1")


def refused(fields: dict[str, Any], route: type = ChatCompletionRequest,
            **kwargs: Any) -> BadRequestError:
    base = {"model": "general", "messages": USER} if route is ChatCompletionRequest else {
        "model": "general", "prompt": "hi"}
    with pytest.raises(BadRequestError) as caught:
        to_orchestrate(route.parse({**base, **fields}), EXPERTS, "req-1", **kwargs)
    return caught.value


# --------------------------------------------------------------------------- translation


def test_a_conversation_stays_turns_and_the_router_reads_the_newest_user_turn() -> None:
    req = chat(messages=[
        {"role": "developer", "content": "Be terse."},
        {"role": "user", "content": [{"type": "text", "text": "My name "},
                                     {"type": "text", "text": "is Ada."}]},
        {"role": "assistant", "content": "Hello Ada!"},
        {"role": "user", "content": "What is my name?"}])
    assert [(m.role, m.content) for m in req.messages] == [
        ("system", "Be terse."), ("user", "My name is Ada."), ("assistant", "Hello Ada!"),
        ("user", "What is my name?")]
    assert req.prompt == "What is my name?"
    assert (req.primary, req.experts) == ("general", [])


def test_every_sampling_parameter_reaches_the_request() -> None:
    req = chat(stop="END", top_p=0.5, presence_penalty=0.5, frequency_penalty=-0.5, seed=7,
               n=3, logprobs=True, top_logprobs=2, max_tokens=50, max_completion_tokens=9,
               user="u1", metadata={"team": "a"}, logit_bias={"42": -100},
               response_format={"type": "json_object"})
    s = req.sampling
    assert (s.stop, s.top_p, s.presence_penalty, s.frequency_penalty) == (["END"], 0.5, 0.5, -0.5)
    assert (s.n, s.logprobs, s.top_logprobs, s.user, s.metadata) == (3, True, 2, "u1", {"team": "a"})
    assert (s.logit_bias, s.response_format.type) == ({"42": -100}, "json_object")
    assert (req.seed, req.max_tokens) == (7, 9)  # max_completion_tokens wins


def test_legacy_completion_is_a_raw_prompt() -> None:
    body = CompletionRequest.parse({"model": "code", "prompt": ["Once upon"], "logprobs": 2,
                                    "echo": False, "best_of": 1})
    req = to_orchestrate(body, EXPERTS, "req-1")
    assert (req.prompt, req.raw, req.messages, req.max_tokens) == ("Once upon", True, None, 16)
    assert (req.sampling.logprobs, req.sampling.top_logprobs) == (True, 2)


REFUSALS = [
    ({"top_k": 5}, "top_k"),
    ({"audio": {"voice": "alloy"}}, "audio"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"reasoning_effort": "high"}, "reasoning_effort"),
    ({"store": True}, "store"),
    ({"service_tier": "flex"}, "service_tier"),
    ({"modalities": ["text", "audio"]}, "modalities"),
    ({"stream_options": {"include_usage": True, "chunk_size": 2}}, "stream_options.chunk_size"),
    ({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "see"}, {"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content[1].type"),
    ({"messages": [{"role": "user", "content": "x", "audio": {"id": "a"}}]},
     "messages[0].audio"),
]


@pytest.mark.parametrize(("fields", "param"), REFUSALS, ids=[r[1] for r in REFUSALS])
def test_what_chorus_cannot_honour_is_a_400_naming_it(fields: dict, param: str) -> None:
    error = refused(fields)
    assert isinstance(error, UnsupportedParameterError) and error.status == 400
    assert error.field == param and error.message.startswith(f"{param}:")


def test_null_and_default_values_of_refused_parameters_are_accepted() -> None:
    req = chat(audio=None, functions=None, store=False, service_tier="auto",
               modalities=["text"], stream_options={"include_usage": True})
    assert req.sampling == Sampling()


@pytest.mark.parametrize(("fields", "param", "status"), [
    ({"top_logprobs": 2}, "top_logprobs", 422),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", 422),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice", 422),
    ({"tool_choice": "required"}, "tool_choice", 422),
    ({"response_format": {"type": "json_schema"}}, "response_format", 422),
    ({"response_format": {"type": "xml"}}, "response_format.type", 422),
    ({"logit_bias": {"hello": 1}}, "logit_bias", 422),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop", 422),
    ({"n": 9}, "n", 422),
    ({"priority": True}, "priority", 422),
    ({"messages": [{"role": "assistant", "content": "x"}]}, "messages", 422),
])
def test_invalid_values_are_a_422_naming_the_field(fields: dict, param: str, status: int) -> None:
    error = refused(fields)
    assert (error.status, error.field) == (status, param), error.message
    assert error.message.startswith(f"{param}:")


def test_legacy_route_refusals() -> None:
    assert refused({"echo": True}, CompletionRequest).field == "echo"
    assert refused({"suffix": "x"}, CompletionRequest).field == "suffix"
    assert refused({"best_of": 3}, CompletionRequest).field == "best_of"
    assert refused({"prompt": ["a", "b"]}, CompletionRequest).field == "prompt"
    assert refused({"prompt": [1, 2]}, CompletionRequest).field.startswith("prompt")


def test_n_for_a_synthesizing_team_is_refused() -> None:
    body = ChatCompletionRequest.parse({"model": "chorus", "messages": USER, "n": 2})
    with pytest.raises(UnsupportedParameterError) as caught:
        to_orchestrate(body, EXPERTS, "r", fusion="synthesize")
    assert caught.value.field == "n"
    assert to_orchestrate(body, EXPERTS, "r", fusion="append").sampling.n == 2


@pytest.mark.parametrize(("body", "header", "expected"), [
    (None, None, "normal"), ("high", None, "high"), ("low", "high", "low"), (None, "low", "low"),
    (-5, None, "high"), (0, None, "normal"), (3, None, "low"), (None, "-1", "high"),
])
def test_priority_from_the_body_or_the_header(body: Any, header: str | None, expected: str) -> None:
    assert request_priority(body, header) == expected


def test_a_bad_priority_names_where_it_came_from() -> None:
    with pytest.raises(BadRequestError) as caught:
        request_priority("urgent", None)
    assert caught.value.field == "priority"
    with pytest.raises(BadRequestError) as caught:
        request_priority(None, "soon")
    assert caught.value.field == "x-chorus-priority"


def test_orchestrate_takes_a_prompt_or_messages() -> None:
    req = OrchestrateRequest.parse({"messages": USER})
    assert req.prompt == "hi" and OrchestrateRequest.parse(req.model_dump()).messages == req.messages
    with pytest.raises(BadRequestError) as caught:
        OrchestrateRequest.parse({"prompt": "other", "messages": USER})
    assert caught.value.field == "messages"


# --------------------------------------------------------------------------- conversation rule


def test_the_expert_system_prompt_comes_first_then_the_callers() -> None:
    turns = chat_turns("You are a coder.", [
        Message(role="system", content="Answer in French."), Message(role="user", content="hi"),
        Message(role="system", content="Be brief.")])
    assert turns == [
        {"role": "system", "content": "You are a coder.\n\nAnswer in French.\n\nBe brief."},
        {"role": "user", "content": "hi"}]
    assert chat_turns(None, [Message(role="user", content="hi")]) == [
        {"role": "user", "content": "hi"}]


# --------------------------------------------------------------------------- team plans


def test_tools_or_json_make_the_primary_answer_alone() -> None:
    config = make_config("mock", experts={"code": {"tool_parser": "hermes"}})
    review = "Review this python code for a security bug"
    assert plan_request(OrchestrateRequest(prompt=review), config).experts  # specialists
    for sampling in ({"tools": [WEATHER], "tool_choice": "required"},
                     {"response_format": {"type": "json_object"}}):
        plan = plan_request(OrchestrateRequest(prompt=review, sampling=sampling), config)
        assert plan.experts == [] and plan.primary.sampling == Sampling.model_validate(sampling)


def test_specialists_sample_free_text_with_the_callers_sampling() -> None:
    config = make_config("mock")
    req = OrchestrateRequest(prompt="Review this python code for a security bug", sampling={
        "stop": ["x"], "top_p": 0.3, "n": 2, "logprobs": True})
    plan = plan_request(req, config)
    assert plan.primary.sampling.n == 2
    assert [(t.sampling.stop, t.sampling.top_p, t.sampling.n, t.sampling.logprobs)
            for t in plan.experts] == [(["x"], 0.3, 1, False)] * len(plan.experts)


def test_auto_tool_choice_needs_the_primarys_tool_parser() -> None:
    config = make_config("mock", experts={"code": {"tool_parser": "hermes"}})
    auto = {"tools": [WEATHER]}
    with pytest.raises(UnsupportedParameterError) as caught:
        plan_request(OrchestrateRequest(prompt="hi", primary="general", sampling=auto), config)
    assert caught.value.field == "tool_choice"
    plan = plan_request(OrchestrateRequest(prompt="hi", primary="code", sampling=auto), config)
    assert plan.primary.expert == "code"
    forced = {**auto, "tool_choice": "required"}
    assert plan_request(OrchestrateRequest(prompt="hi", primary="general", sampling=forced),
                        config).primary.expert == "general"


# --------------------------------------------------------------------------- tools and JSON


SCHEMA = {"type": "object", "$defs": {"Pet": {"type": "object", "properties": {
    "kind": {"enum": ["cat", "dog"]}, "age": {"type": "integer", "minimum": 2}},
    "required": ["kind", "age"], "additionalProperties": False}},
    "properties": {"name": {"type": "string", "minLength": 3}, "pets": {
        "type": "array", "items": {"$ref": "#/$defs/Pet"}, "minItems": 2},
        "nick": {"anyOf": [{"type": "string"}, {"type": "null"}]}, "ok": {"type": "boolean"},
        "score": {"type": "number"}},
    "required": ["name", "pets", "nick", "ok", "score"], "additionalProperties": False}


def test_example_instances_validate_against_their_schema() -> None:
    listed = {"type": "array", "items": SCHEMA, "$defs": SCHEMA["$defs"]}
    for schema in (SCHEMA, WEATHER["function"]["parameters"], listed):
        jsonschema.validate(example_instance(schema), schema)


def test_a_callers_schema_cannot_blow_up_or_break_the_mock() -> None:
    nested: dict = {"type": "integer"}
    for _ in range(6):  # 50^6 values if taken at their word
        nested = {"type": "array", "items": nested, "minItems": 50}
    hostile = [nested, {"$ref": 5}, {"$defs": [], "type": "object"},
               {"type": "integer", "minimum": "a"}, {"type": "array", "minItems": 1e20},
               {"type": "string", "minLength": 10**12}, {"allOf": [3, {"type": "boolean"}]}]
    sizes = [len(json.dumps(example_instance(schema))) for schema in hostile]
    assert max(sizes) < 20_000, sizes
    assert [example_instance(s) for s in hostile[1:4]] == ["chorus", {}, 1]  # leniently read


def test_forced_tool_choice_schemas_and_their_calls() -> None:
    named = Sampling.model_validate({"tools": [WEATHER], "tool_choice": {
        "type": "function", "function": {"name": "get_weather"}}})
    assert forced_schema(named) == WEATHER["function"]["parameters"]
    calls = calls_from_forced('{"city": "Oslo"}', named)
    assert [(c["type"], c["function"]["name"], json.loads(c["function"]["arguments"]))
            for c in calls] == [("function", "get_weather", {"city": "Oslo"})]
    required = Sampling.model_validate({"tools": [WEATHER], "tool_choice": "required",
                                        "parallel_tool_calls": False})
    schema = forced_schema(required)
    value = example_instance(schema)
    jsonschema.validate(value, schema)
    assert schema["maxItems"] == 1
    assert calls_from_forced(json.dumps(value), required)[0]["function"]["name"] == "get_weather"
    assert calls_from_forced('{"city": "Os', named) is None  # cut by max_tokens: no call
    assert forced_schema(Sampling.model_validate({"tools": [WEATHER]})) is None  # auto


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vLLM's parsers")
def test_the_experts_vllm_parser_reads_the_mocks_tool_call_text() -> None:
    auto = Sampling.model_validate({"tools": [WEATHER]})
    text = 'Let me check. <tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>'
    content, calls = tool_calls.extract("hermes", None, text, auto)
    assert content == "Let me check. "
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("get_weather", {"city": "Oslo"})]
    assert tool_calls.extract("hermes", None, "no call here", auto) == ("no call here", None)


# --------------------------------------------------------------------------- the mock


FAST = MockOptions(ttft_s=0, token_latency_s=0, tokens=12)


async def generate(sampling: dict[str, Any] | None = None, max_tokens: int = 100) -> list:
    request = GenerationRequest(request_id="r", messages=[{"role": "user", "content": "hi you"}],
                                max_tokens=max_tokens, sampling=Sampling.model_validate(
                                    sampling or {}))
    return [d async for d in MockEngine("general", FAST).stream(request)]


def text_of(deltas: list, index: int = 0) -> str:
    return "".join(d.text for d in deltas if d.index == index)


async def test_the_mock_honours_stop_max_tokens_and_n() -> None:
    whole = text_of(await generate())
    assert whole == "".join(mock_text("general", "hi you", 0, 12))
    word = whole.split()[5]
    cut = await generate({"stop": ["zzz", f" {word}"]})
    assert text_of(cut) == whole[: whole.index(f" {word}")] and cut[-1].finish_reason == "stop"
    capped = await generate(max_tokens=3)
    assert (sum(d.tokens for d in capped), capped[-1].finish_reason) == (3, "length")
    two = await generate({"n": 2})
    assert text_of(two, 0) == whole and text_of(two, 1) == "".join(mock_text("general", "hi you", 1, 12))
    assert [d.finish_reason for d in two if d.finish_reason] == ["stop", "stop"]
    assert two[0].prompt_tokens == 2 == count_tokens(GenerationRequest(
        request_id="r", messages=[{"role": "user", "content": "hi you"}]))


async def test_the_mock_gives_logprobs_json_and_tool_call_text_when_asked() -> None:
    deltas = await generate({"logprobs": True, "top_logprobs": 3}, max_tokens=5)
    entries = [e for d in deltas for e in d.logprobs]
    assert [e["token"] for e in entries] == [d.text for d in deltas] or len(entries) == 5
    assert all(len(e["top_logprobs"]) == 3 and e["logprob"] < 0 for e in entries)
    fmt = {"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA}}
    jsonschema.validate(json.loads(text_of(await generate({"response_format": fmt}))), SCHEMA)
    assert json.loads(text_of(await generate({"response_format": {"type": "json_object"}})))
    call = text_of(await generate({"tools": [WEATHER]}))
    assert call.startswith("<tool_call>") and json.loads(call[11:-12])["name"] == "get_weather"


# --------------------------------------------------------------------------- answers


def done(**primary: Any) -> DoneEvent:
    base = {"task_id": "t", "expert": "general", "role": "primary", "status": TaskStatus.SUCCESS,
            "result": "Hello", "tokens": 2, "prompt_tokens": 5, "finish_reason": "length"}
    result = TaskResult(**{**base, **primary})
    critic = TaskResult(task_id="c", expert="critic", status=TaskStatus.SUCCESS, result="ok",
                        tokens=1, prompt_tokens=6)
    return DoneEvent(request_id="r", primary=result, experts=[critic],
                     content="Hello\n\n---\nExpert contributions:\n**critic**: ok")


def test_choices_usage_and_the_per_expert_breakdown() -> None:
    event = done(samples=[Sample(text="Bye", tokens=3, finish_reason="stop")])
    body = Shape("chorus", "r", "chat").completion(event, "append")
    assert [(c["index"], c["finish_reason"]) for c in body["choices"]] == [(0, "length"), (1, "stop")]
    assert body["choices"][1]["message"]["content"].startswith("Bye\n\n---\nExpert")
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10}
    assert [(u["expert"], u["completion_tokens"]) for u in body["usage_by_expert"]] == [
        ("general", 5), ("critic", 1)]
    assert "usage_by_expert" not in Shape("general", "r", "chat").completion(event, "append")
    assert usage(event)["completion_tokens"] == 5


def test_tool_calls_end_with_finish_reason_tool_calls_and_no_content() -> None:
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": "{}"}}
    event = done(tool_calls=[call]).model_copy(update={"content": "", "experts": []})
    message = Shape("code", "r", "chat").completion(event, "append")["choices"][0]
    assert message["finish_reason"] == "tool_calls"
    assert message["message"]["content"] is None and message["message"]["tool_calls"] == [call]
    assert choices(event, "append")[0].tool_calls == [call]


def test_legacy_logprobs_shape() -> None:
    entries = [{"token": "Hi", "logprob": -0.1, "top_logprobs": [{"token": "Hi", "logprob": -0.1}]},
               {"token": " there", "logprob": -0.2, "top_logprobs": []}]
    assert legacy_logprobs(entries) == {"tokens": ["Hi", " there"], "token_logprobs": [-0.1, -0.2],
                                        "top_logprobs": [{"Hi": -0.1}, {}], "text_offset": [0, 2]}


async def test_streamed_chunks_live_text_then_other_choices_ends_and_usage() -> None:
    from orchestration.models import FusionEvent, PrimaryDelta

    event = done(samples=[Sample(text="Bye", tokens=3, finish_reason="stop")],
                 logprobs=[{"token": "Hello", "logprob": -0.5, "bytes": [], "top_logprobs": []}])

    async def events():
        yield PrimaryDelta(request_id="r", expert="general", delta="Hel")
        yield PrimaryDelta(request_id="r", expert="general", delta="lo")
        yield FusionEvent(request_id="r", strategy="append", content=event.content)
        yield event

    lines = [line async for line in stream(events(), Shape("chorus", "r", "chat"), "append",
                                           False, True)]
    assert lines[-1] == "data: [DONE]\n\n"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    pieces = [c["choices"][0]["delta"].get("content") for c in chunks if c["choices"]
              and c["choices"][0]["index"] == 0]
    assert "".join(p or "" for p in pieces) == event.content
    ends = [(c["choices"][0]["index"], c["choices"][0]["finish_reason"]) for c in chunks
            if c["choices"] and c["choices"][0]["finish_reason"]]
    assert ends == [(0, "length"), (1, "stop")]
    end0 = next(c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"] == "length")
    assert end0["choices"][0]["logprobs"]["content"][0]["token"] == "Hello"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 5
