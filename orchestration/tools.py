"""Tool calls and structured output, the engine-independent part (no Ray, no vLLM).

Two ways a model answers with tool calls (docs/openai.md):

- **forced** (`tool_choice: "required"` or a named function): the engine's structured
  output constrains the answer to JSON — the named function's arguments, or a list of
  `{"name", "parameters"}` — exactly as vLLM's own server does. Any model can do it,
  the tiny one included; `calls_from_forced` turns that JSON into OpenAI tool calls.
- **auto**: the model decides, in its own format (e.g. Hermes' `<tool_call>` tags), and
  the expert's configured vLLM tool parser (`experts[].tool_parser`) extracts the
  calls (`actors/engines/tool_calls.py`).

`example_instance` builds a deterministic value that satisfies a JSON schema: the mock
engine answers structured requests with it.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from orchestration.generation import NamedToolChoice, Sampling


def forced_name(sampling: Sampling) -> str | None:
    choice = sampling.tool_choice
    return choice.name if isinstance(choice, NamedToolChoice) else None


def is_forced(sampling: Sampling) -> bool:
    return bool(sampling.tools) and (forced_name(sampling) is not None
                                     or sampling.tool_choice == "required")


def _parameters(schema: dict[str, Any] | None) -> dict[str, Any]:
    return schema or {"type": "object", "properties": {}}


def forced_schema(sampling: Sampling) -> dict[str, Any] | None:
    """The JSON schema a forced tool choice constrains the answer to (None: not forced)."""
    if not is_forced(sampling):
        return None
    tools = sampling.tools or []
    name = forced_name(sampling)
    if name is not None:
        tool = next(t for t in tools if t.function.name == name)
        return _parameters(tool.function.parameters)
    item = {"anyOf": [{
        "type": "object",
        "properties": {"name": {"type": "string", "enum": [t.function.name]},
                       "parameters": _parameters(t.function.parameters)},
        "required": ["name", "parameters"]} for t in tools]}
    array: dict[str, Any] = {"type": "array", "minItems": 1, "items": item}
    if not sampling.parallel_tool_calls:
        array["maxItems"] = 1
    return array


def tool_call(name: str, arguments: Any) -> dict[str, Any]:
    """One call in OpenAI's shape (`arguments` is a JSON string)."""
    text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": text}}


def calls_from_forced(text: str, sampling: Sampling) -> list[dict[str, Any]] | None:
    """The tool calls in a forced answer; None if the text is not the constrained JSON
    (cut by `max_tokens`, say): the caller then gets the text and `finish_reason`."""
    try:
        value = json.loads(text)
    except ValueError:  # truncated or not JSON: no call to report
        return None
    name = forced_name(sampling)
    if name is not None:
        return [tool_call(name, value)] if isinstance(value, dict) else None
    if not isinstance(value, list):
        return None
    calls = [tool_call(item["name"], item.get("parameters", {})) for item in value
             if isinstance(item, dict) and isinstance(item.get("name"), str)]
    return calls or None


def json_constraint(sampling: Sampling) -> dict[str, Any] | None:
    """What the answer must be: `{"json": schema}`, `{"json_object": True}` or None."""
    if (schema := forced_schema(sampling)) is not None:
        return {"json": schema}
    fmt = sampling.response_format
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"json_object": True}
    assert fmt.json_schema is not None
    return {"json": fmt.json_schema.schema_}


# ------------------------------------------------------------------ example values


EXAMPLE_NODES = 2000  # values one example may hold: a client's schema must not blow it up


def example_instance(schema: Any, defs: dict[str, Any] | None = None) -> Any:
    """A deterministic value valid against `schema` (the subset clients send: objects,
    arrays, scalars, enum/const, anyOf/oneOf/allOf, $ref into $defs).

    The schema is the caller's: whatever it asks (`minItems: 1e20`, arrays nested in
    arrays, `$ref: 5`), the value stays within `EXAMPLE_NODES` values and never raises;
    past the budget the rest is `null`."""
    return _Example(EXAMPLE_NODES).value(schema, defs or {}, 0)


def _number(value: Any, default: float) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    return value if ok and abs(value) < 1e15 else default


class _Example:
    def __init__(self, budget: int) -> None:
        self.budget = budget

    def value(self, schema: Any, defs: dict[str, Any], depth: int) -> Any:
        self.budget -= 1
        if not isinstance(schema, dict) or depth > 16 or self.budget < 0:
            return None
        for key in ("$defs", "definitions"):
            if isinstance(schema.get(key), dict):
                defs = {**defs, **schema[key]}
        if isinstance(schema.get("$ref"), str):
            return self.value(defs.get(schema["$ref"].rsplit("/", 1)[-1]), defs, depth + 1)
        if "const" in schema:
            return schema["const"]
        if isinstance(schema.get("enum"), list) and schema["enum"]:
            return schema["enum"][0]
        for key in ("anyOf", "oneOf"):
            if isinstance(schema.get(key), list) and schema[key]:
                return self.value(schema[key][0], defs, depth + 1)
        if isinstance(schema.get("allOf"), list):
            merged: dict[str, Any] = {}
            for part in schema["allOf"]:
                if isinstance(part, dict):
                    merged.update(part)
            return self.value(merged, defs, depth + 1)
        kind = schema.get("type", "object" if "properties" in schema else "string")
        if isinstance(kind, list):
            kind = next((k for k in kind if k != "null"), "null")
        if kind == "object":
            props = schema.get("properties")
            props = props if isinstance(props, dict) else {}
            return {name: self.value(sub, defs, depth + 1) for name, sub in props.items()}
        if kind == "array":
            count = int(min(max(_number(schema.get("minItems"), 1), 1), 64))
            return [self.value(schema.get("items"), defs, depth + 1) for _ in range(count)]
        if kind == "integer":
            return int(_number(schema.get("minimum"), 1))
        if kind == "number":
            return float(_number(schema.get("minimum"), 1.5))
        if kind == "boolean":
            return True
        if kind == "null":
            return None
        if "minLength" in schema:
            return "x" * int(min(max(_number(schema["minLength"], 1), 1), 4096))
        return "chorus"
