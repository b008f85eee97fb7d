"""Tool calls out of a finished answer, in the expert's process (it has the tokenizer).

A forced tool choice was constrained to JSON by the engine (`orchestration.tools`);
with `tool_choice: auto` the model wrote calls in its own format and vLLM's tool parser
named by `experts[].tool_parser` (e.g. `hermes`) extracts them — the parser vLLM's own
server would use, so the same model behaves the same behind Chorus. vLLM is imported
only for an expert that names a parser.
"""

from __future__ import annotations

from typing import Any

from orchestration.config import ExpertConfig
from orchestration.errors import ConfigError
from orchestration.generation import Sampling
from orchestration.tools import calls_from_forced, is_forced, tool_call


class _NoTokenizer:
    """What a parser gets on an engine without a tokenizer (the mock): parsers need one
    only for streaming, which Chorus does not ask of them."""

    def get_vocab(self) -> dict[str, int]:
        return {}


def parser_class(name: str) -> Any:
    from vllm.tool_parsers import ToolParserManager

    return ToolParserManager.get_tool_parser(name)


def check_parser(expert: ExpertConfig) -> None:
    """Fail the expert's start, naming the field, when its tool parser cannot be loaded."""
    if expert.tool_parser is None:
        return
    try:
        parser_class(expert.tool_parser)
    except ImportError as exc:  # vLLM is not installed here: no parser to load
        raise ConfigError(f"experts.{expert.name}.tool_parser: needs vLLM installed ({exc})",
                          field=f"experts.{expert.name}.tool_parser") from None
    except KeyError:  # vLLM says which names exist
        from vllm.tool_parsers import ToolParserManager

        known = ", ".join(ToolParserManager.list_registered())
        raise ConfigError(
            f"experts.{expert.name}.tool_parser: unknown parser {expert.tool_parser!r}; "
            f"vLLM has: {known}", field=f"experts.{expert.name}.tool_parser") from None


def extract(parser: str | None, tokenizer: Any, text: str,
            sampling: Sampling) -> tuple[str, list[dict[str, Any]] | None]:
    """(content, tool calls): calls in OpenAI's shape, or None with the text unchanged."""
    if not sampling.calls_tools:
        return text, None
    if is_forced(sampling):
        calls = calls_from_forced(text, sampling)
        return ("", calls) if calls else (text, None)
    if parser is None:  # refused at the ingress; an engine-side caller gets the text
        return text, None
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

    request = ChatCompletionRequest(
        model="chorus", messages=[{"role": "user", "content": ""}], tool_choice="auto",
        tools=[t.model_dump(exclude_none=True) for t in sampling.tools or []])
    found = parser_class(parser)(tokenizer or _NoTokenizer(), request.tools).extract_tool_calls(
        text, request)
    if not found.tools_called:
        return text, None
    calls = [tool_call(c.function.name, c.function.arguments) for c in found.tool_calls]
    if not sampling.parallel_tool_calls:
        calls = calls[:1]
    return found.content or "", calls
