"""ExpertActor: one replica of one expert = one async Ray actor running one engine.

Two calls serve streamed attempts. The executor calls `run(task, key, caller)`, which
generates the whole answer and returns a `Completion` (one ObjectRef the executor can
put a deadline on and `ray.cancel`). When a caller wants the text as it is generated,
`run` also writes it to the attempt's channel, and the caller process reads the text of
all its attempts on this replica through one `session(caller)` — a streaming generator
of coalesced batches (see `orchestration/coalesce.py`): the tokens never pass through
the executor, and one batch serves every request of that caller.

A task with a `prefix` continues an answer an earlier attempt began (docs/failover.md):
the engine generates what follows, only that is streamed, and the Completion holds the
whole answer. An attempt that fails with a transient error says what it had generated
(`TransientError.generated`), so the next attempt can continue it.

A *held* attempt (a hedge, or one whose first token is late: `hold`) claims its first
token from the executor before it sends it; only the winner of its race sends any
text (docs/hedging.md).
"""

from __future__ import annotations

import asyncio
import os
import warnings
from collections import OrderedDict, deque
from collections.abc import AsyncIterator
from typing import Any

import ray
from ray.actor import ActorHandle

from actors.engines import Delta, Engine, GenerationRequest, make_engine, tool_calls
from orchestration.coalesce import Channels
from orchestration.config import ExpertConfig, StreamConfig
from orchestration.errors import (
    AnswerInterruptedError,
    StalledError,
    TaskCancelledError,
    TransientError,
)
from orchestration.generation import Message, chat_turns
from orchestration.models import ExpertTask
from orchestration.replicas import replica_index
from orchestration.wire import Completion

EARLY_HOLDS = 256  # holds kept for attempts whose call has not started (see `hold`)


def _request(task: ExpertTask, key: str) -> GenerationRequest:
    if task.raw:
        conversation: dict[str, Any] = {"prompt": task.prompt}
    else:
        turns = task.messages or [Message(role="user", content=task.prompt)]
        conversation = {"messages": chat_turns(task.system_prompt, turns)}
    return GenerationRequest(
        request_id=key,
        sampling_key=task.id,
        **conversation,
        prefix=task.prefix,
        max_tokens=task.max_tokens,
        temperature=task.temperature,
        seed=task.seed,
        sampling=task.sampling,
        rank=task.rank,
    )


async def _paced(deltas: AsyncIterator[Delta], task: ExpertTask,
                 expert: str) -> AsyncIterator[Delta]:
    """The engine's deltas, or StalledError when the first is later than the task's
    `ttft_timeout_s` or the next later than its `stall_timeout_s` after the one before.
    The engine's stream is cancelled there (vLLM aborts the request, freeing its slot);
    a long answer that keeps coming is never cut here."""
    tokens = 0
    try:
        while True:
            limit = task.stall_timeout_s if tokens else task.ttft_timeout_s
            try:
                async with asyncio.timeout(limit):
                    delta = await anext(deltas)
            except StopAsyncIteration:
                return
            except TimeoutError:
                what = (f"no new token for {limit:g}s after {tokens} tokens" if tokens
                        else f"no first token within {limit:g}s")
                raise StalledError(f"{expert}: {what} (attempt {task.attempt})") from None
            tokens += delta.tokens or 1
            yield delta
    finally:
        await deltas.aclose()  # type: ignore[attr-defined]


class _Choice:
    """One choice's text, tokens and logprobs as they come."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.tokens = 0
        self.finish_reason: str | None = None
        self.logprobs: list[dict[str, Any]] | None = None

    def add(self, delta: Delta) -> None:
        self.parts.append(delta.text)
        self.tokens += delta.tokens
        if delta.finish_reason is not None:
            self.finish_reason = delta.finish_reason
        if delta.logprobs is not None:
            if self.logprobs is None:
                self.logprobs = []
            self.logprobs.extend(delta.logprobs)  # per delta: no copy of what came before


@ray.remote
class ExpertActor:
    """Serves one expert's tasks through its engine; knows engines only by protocol."""

    def __init__(self, config: ExpertConfig, replica: str, stream: StreamConfig) -> None:
        self.config = config
        self.replica = replica
        self.engine: Engine = make_engine(config, replica_index(replica))
        self.channels = Channels(linger_s=stream.linger_s)
        self._started: asyncio.Task[None] | None = None
        # Attempts without a first token yet -> where they claim it (held), or None.
        self._tokenless: dict[str, ActorHandle | None] = {}
        self._early_holds: OrderedDict[str, ActorHandle] = OrderedDict()  # not started yet
        self._began: deque[str] = deque(maxlen=EARLY_HOLDS)  # attempts started here lately
        self.pid = os.getpid()
        self.node_id = ray.get_runtime_context().get_node_id()
        # Ray re-runs __init__ after a crash; this tells the restart apart from a start.
        with warnings.catch_warnings():  # Ray's property warns about an API it uses itself
            warnings.simplefilter("ignore", DeprecationWarning)
            self.reconstructed = ray.get_runtime_context().was_current_actor_reconstructed

    async def _ensure_started(self) -> None:
        # Started lazily (and once) so that a restarted actor warms its engine up again
        # on its first call without anyone having to remember to call `ready()`.
        if self._started is None:
            self._started = asyncio.ensure_future(self._start())
        await asyncio.shield(self._started)

    async def _start(self) -> None:
        tool_calls.check_parser(self.config)
        await self.engine.start()

    async def ready(self) -> dict[str, Any]:
        await self._ensure_started()
        return {"expert": self.config.name, "replica": self.replica, "node_id": self.node_id,
                "pid": self.pid}

    @ray.method(enable_task_events=False)  # hot path: see docs/token-path.md
    async def run(self, task: ExpertTask, key: str, caller: str | None,
                  gate: ActorHandle | None = None) -> Completion:
        """Generate one attempt's whole answer; for a `caller`, publish it as it comes.
        Held (a `gate`, or `hold` since): its first token is claimed from the gate first."""
        await self._ensure_started()
        channels = self.channels
        channel = channels.open(key, caller) if caller is not None else None
        loop = asyncio.get_running_loop()
        began = loop.time()
        done = Completion(replica=self.replica)
        choices: dict[int, _Choice] = {}
        prefix_tokens = 0
        self._tokenless[key] = self._early_holds.pop(key, None) or gate
        self._began.append(key)
        try:
            if task.prefix and not getattr(self.engine, "continues", True):
                raise AnswerInterruptedError(
                    f"{self.config.name}: this engine cannot continue an answer that broke "
                    f"off after {len(task.prefix)} characters reached the caller")
            async for delta in _paced(self.engine.stream(_request(task, key)), task,
                                      self.config.name):
                if done.ttft_s is None:
                    done.ttft_s = loop.time() - began
                    await self._claim(key, task)
                if delta.prompt_tokens is not None:
                    done.prompt_tokens = delta.prompt_tokens
                if delta.prefix_tokens is not None:
                    prefix_tokens = delta.prefix_tokens
                choices.setdefault(delta.index, _Choice()).add(delta)
                if channel is not None and delta.index == 0:  # choice 0 is the live one
                    channels.put(channel, delta.text, delta.tokens)
        except TransientError as exc:  # the next attempt continues what this one made
            exc.generated = "".join(choices[0].parts) if 0 in choices else ""
            raise
        finally:
            self._tokenless.pop(key, None)
            if channel is not None:  # ended, whole or not: its session sends the rest
                channels.finish(channel)
        done = self._completed(done, task,
                               [choices.get(i, _Choice()) for i in range(len(choices) or 1)])
        if task.prefix:  # the answer is the prefix and its continuation, counted once
            done.text = task.prefix + done.text
            done.completion_tokens += prefix_tokens
        return done

    async def _claim(self, key: str, task: ExpertTask) -> None:
        """At an attempt's first token: a held one asks its gate whether it won (its
        hedge may have answered first: then it is cancelled, and sends nothing)."""
        gate = self._tokenless.pop(key, None)
        if gate is not None and not await gate.first_token.remote(key):
            raise TaskCancelledError(f"{self.config.name}: attempt {task.attempt} lost to "
                                     "its hedge (docs/hedging.md)")

    def hold(self, key: str, gate: ActorHandle) -> bool:
        """Hold attempt `key` if it has no token yet: it claims its first from `gate`.
        False: it has a token already. An attempt whose call has not started here yet
        (a busy process) is held when it starts; the few such holds are kept (the last
        `EARLY_HOLDS`: one whose call never comes, cancelled on its way, is dropped)."""
        if key in self._tokenless:
            self._tokenless[key] = gate
            return True
        if key in self._began:
            return False  # it ran here already: it has its token (or is over)
        self._early_holds[key] = gate
        while len(self._early_holds) > EARLY_HOLDS:
            self._early_holds.popitem(last=False)
        return True

    def _completed(self, done: Completion, task: ExpertTask, choices: list[_Choice]) -> Completion:
        """Choice 0 in the Completion's fields, the others in `extras["samples"]`."""
        tokenizer = getattr(self.engine, "tokenizer", None)
        samples = []
        for choice in choices:
            content, calls = tool_calls.extract(self.config.tool_parser, tokenizer,
                                                "".join(choice.parts), task.sampling)
            samples.append({"text": content, "tokens": choice.tokens,
                            "finish_reason": choice.finish_reason,
                            "logprobs": choice.logprobs, "tool_calls": calls})
        first = samples[0]
        done.text, done.completion_tokens = first["text"], first["tokens"]
        done.finish_reason = first["finish_reason"]
        for name in ("logprobs", "tool_calls"):
            if first[name] is not None:
                done.extras[name] = first[name]
        if len(samples) > 1:
            done.extras["samples"] = samples[1:]
        return done

    @ray.method(enable_task_events=False)  # hot path: see docs/token-path.md
    async def session(self, caller: str,
                      hold_s: float = 0.0) -> AsyncIterator[list[tuple[str, str, int]]]:
        """The text of every streamed attempt of `caller` here, in coalesced batches of
        (key, text, tokens), until the caller closes it."""
        async for batch in self.channels.session(caller, hold_s):
            yield batch

    async def stats(self) -> dict[str, Any]:
        engine_stats = await self.engine.stats()
        return {
            "expert": self.config.name,
            "replica": self.replica,
            "backend": self.config.backend,
            "pid": self.pid,
            "node_id": self.node_id,
            "reconstructed": self.reconstructed,
            "channels": len(self.channels),
            **engine_stats,
        }

    def history(self) -> list[tuple[str, int]]:
        """The engine's recent (request_id, rank) in arrival order (mock engines)."""
        history = getattr(self.engine, "history", None)
        return history() if history is not None else []

    def prompts(self) -> list[tuple[str, str]]:
        """The engine's recent (request_id, prompt as rendered for the model) (vLLM)."""
        prompts = getattr(self.engine, "prompts", None)
        return prompts() if prompts is not None else []

    async def vigil(self) -> None:
        """Never returns: the supervisor learns of this process's death when it fails."""
        await asyncio.Event().wait()

    def set_stream(self, stream: StreamConfig) -> None:
        """New text-channel settings (a redeploy): applied in place, no restart."""
        self.channels.linger_s = stream.linger_s

    async def shutdown(self) -> None:
        await self.engine.shutdown()
