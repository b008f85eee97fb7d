"""Throughput of vLLM raw vs. behind Chorus (engine protocol, and the whole stack).

    python bench/bench_vllm.py --requests 8 --max-tokens 64

Each *target* is an async context manager that yields `generate(prompt) -> text`; the
bench sends the same N prompts to each target concurrently (temperature 0), counts the
generated tokens with the model's tokenizer and reports tokens/s and the ratio to the
first target. Targets run one after another, never side by side, so each has the whole
machine. To add one (e.g. the whole Chorus stack), write a factory and put it in TARGETS.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import statistics
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from orchestration.config import ExpertConfig, load_config
from orchestration.generation import Message, chat_turns

Generate = Callable[[str], Awaitable[str]]
TargetFactory = Callable[[ExpertConfig, argparse.Namespace], AbstractAsyncContextManager[Generate]]

PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a bicycle works to a ten-year-old.",
    "Describe a walk through a busy market in Marrakesh.",
    "Write a letter from a cat to its owner about breakfast.",
    "Explain why the sky is blue, step by step.",
    "Describe the life cycle of a butterfly.",
    "Write a recipe for a simple tomato soup with instructions.",
    "Tell the story of a robot learning to paint.",
]


@dataclass
class Result:
    target: str
    requests: int
    tokens: int
    seconds: float
    tokens_per_s: float
    texts: list[str] = field(repr=False)


def resolve_model(model: str) -> str:
    """The model path vLLM loads; `smollm2` is the prepared tiny model."""
    if model in ("smollm2", "chorus:smollm2"):
        from orchestration.modelprep import prepare_model

        return str(prepare_model())
    return model


def render(tokenizer: Any, system_prompt: str | None, prompt: str) -> str:
    """The chat turn as VLLMEngine renders it, so both targets see the same tokens."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": prompt})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@asynccontextmanager
async def direct_target(expert: ExpertConfig, args: argparse.Namespace) -> AsyncIterator[Generate]:
    """vLLM's AsyncLLM with no Chorus code in between: the baseline."""
    from vllm import AsyncEngineArgs, SamplingParams
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine.async_llm import AsyncLLM

    engine_args = AsyncEngineArgs(model=resolve_model(expert.model), **expert.engine)
    # Held in a list so `finally` can drop the only reference: something in vLLM's
    # shutdown keeps this frame alive, and an AsyncLLM left to its __del__ at
    # interpreter exit fails noisily.
    engine = [AsyncLLM.from_engine_args(engine_args)]
    tokenizer = engine[0].get_tokenizer()
    # Deltas, like VLLMEngine, so the ratio measures the wrapper and not streaming.
    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=0.0, output_kind=RequestOutputKind.DELTA
    )

    async def generate(prompt: str) -> str:
        text = render(tokenizer, expert.system_prompt, prompt)
        parts = []
        async for out in engine[0].generate(
            {"prompt": text},
            params,
            f"direct-{uuid.uuid4().hex[:8]}",
            tokenization_kwargs={"add_special_tokens": False},
        ):
            parts.extend(c.text for c in out.outputs)
        return "".join(parts)

    try:
        yield generate
    finally:
        engine.pop().shutdown()


@asynccontextmanager
async def engine_target(expert: ExpertConfig, args: argparse.Namespace) -> AsyncIterator[Generate]:
    """The same model through `VLLMEngine` (the Engine protocol an ExpertActor uses)."""
    from actors.engines.base import GenerationRequest
    from actors.engines.vllm import VLLMEngine

    engine = VLLMEngine(expert.name, expert.model, expert.engine, exit_on_dead=False)
    await engine.start()

    async def generate(prompt: str) -> str:
        request = GenerationRequest(
            request_id=f"bench-{uuid.uuid4().hex[:8]}",
            messages=chat_turns(expert.system_prompt, [Message(role="user", content=prompt)]),
            max_tokens=args.max_tokens,
            temperature=0.0,
        )
        return "".join([delta.text async for delta in engine.stream(request)])

    try:
        yield generate
    finally:
        await engine.shutdown()


@asynccontextmanager
async def chorus_target(expert: ExpertConfig, args: argparse.Namespace) -> AsyncIterator[Generate]:
    """The whole path of a request: client, router, executor, expert actor, engine."""
    import ray

    from orchestration.client import Client

    config = load_config(args.config)
    solo = expert.model_copy(update={"fallback": None})
    team = config.model_copy(update={
        "experts": [solo], "router": config.router.model_copy(update={"primary": solo.name})})
    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(address="local", include_dashboard=False, log_to_driver=False)
    try:
        async with Client.local(team) as client:

            async def generate(prompt: str) -> str:
                # Streamed, as a caller reading the answer live gets it: the token path.
                text = ""
                async for event in client.stream(prompt, experts=[], temperature=0.0,
                                                 max_tokens=args.max_tokens):
                    if event.type == "primary":
                        text += event.delta
                return text

            yield generate
    finally:
        if started_ray:
            ray.shutdown()


TARGETS: dict[str, TargetFactory] = {
    "direct": direct_target, "engine": engine_target, "chorus": chorus_target}


async def measure(name: str, generate: Generate, prompts: list[str], count: Callable) -> Result:
    """Send all prompts at once; tokens/s over the wall time of the whole batch."""
    await generate(prompts[0])  # warm-up: first-request costs are not throughput
    start = time.perf_counter()
    texts = await asyncio.gather(*(generate(p) for p in prompts))
    seconds = time.perf_counter() - start
    tokens = sum(count(t) for t in texts)
    return Result(name, len(prompts), tokens, seconds, tokens / seconds, list(texts))


async def run(args: argparse.Namespace) -> list[Result]:
    """Run the chosen targets one after another on the same prompts."""
    config = load_config(args.config)
    expert = config.expert(args.expert or config.router.primary)
    for key, value in expert.env.items():  # what the actor would get from Ray
        os.environ.setdefault(key, value)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(expert.model))

    def count(text: str) -> int:
        return len(tokenizer.encode(text, add_special_tokens=False))

    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.requests)]
    results = []
    for _ in range(args.rounds):  # alternated, so drift on a busy machine hits all alike
        for name in args.targets:
            async with TARGETS[name](expert, args) as generate:
                results.append(await measure(name, generate, prompts, count))
            # AsyncLLM sits in reference cycles; collect it now, while vLLM's modules are
            # alive, not at interpreter exit (where its __del__ fails noisily).
            gc.collect()
    return results


def report(results: list[Result]) -> str:
    """A small table plus each target's ratio to the first (the baseline)."""
    base = results[0].tokens_per_s if results else 0.0
    lines = [f"{'target':<10}{'requests':>9}{'tokens':>8}{'seconds':>9}{'tok/s':>9}{'ratio':>7}"]
    for r in results:
        ratio = r.tokens_per_s / base if base else 0.0
        lines.append(
            f"{r.target:<10}{r.requests:>9}{r.tokens:>8}{r.seconds:>9.2f}"
            f"{r.tokens_per_s:>9.1f}{ratio:>7.2f}"
        )
    if len(results) > 1:
        same = all(r.texts == results[0].texts for r in results[1:])
        lines.append(f"identical texts across targets (temperature 0): {same}")
    medians = median_ratios(results)
    if len(results) > len(medians):
        lines.append("median over rounds: " + ", ".join(
            f"{name} {ratio:.2f}" for name, ratio in medians.items()))
    return "\n".join(lines)


def median_ratios(results: list[Result]) -> dict[str, float]:
    """Each target's median tokens/s over the rounds, as a ratio to the baseline's median."""
    by_target: dict[str, list[float]] = {}
    for r in results:
        by_target.setdefault(r.target, []).append(r.tokens_per_s)
    medians = {name: statistics.median(values) for name, values in by_target.items()}
    base = medians[results[0].target] if results else 0.0
    return {name: value / base for name, value in medians.items()} if base else {}


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", "-n", type=int, default=8, help="concurrent prompts")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument(
        "--config", default="config/cpu.yaml", help="team config to take the engine from"
    )
    parser.add_argument("--expert", help="expert whose model/engine to use (default: primary)")
    parser.add_argument(
        "--targets",
        type=lambda s: s.split(","),
        default=list(TARGETS),
        help=f"comma-separated, first is the baseline ({', '.join(TARGETS)})",
    )
    parser.add_argument("--rounds", type=int, default=1,
                        help="run the targets this many times, alternated; report medians")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    unknown = [t for t in args.targets if t not in TARGETS]
    if unknown:
        parser.error(f"unknown target(s): {', '.join(unknown)}")
    results = asyncio.run(run(args))
    print(report(results))
    if args.json:
        args.json.write_text(json.dumps({"runs": [asdict(r) for r in results],
                                         "median_ratio": median_ratios(results)}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
