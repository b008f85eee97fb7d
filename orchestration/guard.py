"""Response guard: strip `<think>` reasoning and redact secrets, on whole texts or on a stream.

`ResponseGuard.sanitize` is the definition. `StreamGuard` is its incremental twin: however a
text is cut into deltas, what it emits, concatenated, equals `sanitize` of the whole text
(for secrets that fit in the hold window: see `StreamGuard` for the design and its limits).
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from orchestration.config import GuardConfig
from orchestration.errors import ConfigError

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
# An unclosed <think> hides the rest of the text. A stray </think> (the chat template opened
# the block) loses only the tag: what came before it has already been streamed.
_THINK_RE = re.compile(r"<think>[\s\S]*?(?:</think>|\Z)|</think>")
_TAG_RE = re.compile(r"</?think>")
MAX_HOLD = 256  # longest secret a pattern is expected to match (API keys, tokens)
BLOCK_HOLD = 8192  # PEM private keys: a 4096-bit RSA key is ~3.3k characters
CONTEXT = 16  # emitted characters kept so `\b` and lookbehinds see what came before


def _literal_prefix(pattern: re.Pattern[str]) -> str:
    """The literal text every match of `pattern` starts with ('' when it cannot be told)."""
    try:  # CPython's own parser (3.11+); elsewhere we fall back to holding the whole window
        from re import _constants, _parser

        items = _parser.parse(pattern.pattern, pattern.flags).data
    except Exception:
        return ""
    chars: list[str] = []
    for op, arg in items:
        if op is _constants.AT:  # zero-width (`\b`, `^`): the match still starts with what follows
            continue
        if op is not _constants.LITERAL:
            break
        chars.append(chr(arg))
    return "".join(chars)


class _Rule:
    """One redaction pattern, plus where the stream must look for matches still in progress."""

    def __init__(self, pattern: re.Pattern[str], max_hold: int, block_hold: int) -> None:
        self.pattern = pattern
        self.prefix = _literal_prefix(pattern)
        # PEM armor is the one common secret longer than max_hold; its BEGIN line is so
        # distinctive that holding it long delays no ordinary text.
        self.hold = block_hold if self.prefix.startswith("-----BEGIN") else max_hold
        # Where a match may begin: the whole prefix, or a piece of it cut by the buffer's end.
        alternatives = [re.escape(self.prefix)] + [
            re.escape(self.prefix[:k]) + r"\Z" for k in range(len(self.prefix) - 1, 0, -1)
        ]
        flags = pattern.flags & (re.IGNORECASE | re.ASCII)
        self.start = re.compile("|".join(alternatives), flags) if self.prefix else None


class ResponseGuard:
    """Strips reasoning blocks and redacts secrets as `GuardConfig` says; patterns compiled once."""

    def __init__(
        self,
        config: GuardConfig | None = None,
        *,
        max_hold: int = MAX_HOLD,
        block_hold: int = BLOCK_HOLD,
    ) -> None:
        config = config or GuardConfig()
        self.strip_think = config.strip_think
        self.replacement = config.replacement
        self.rules: list[_Rule] = []
        for i, source in enumerate(config.redact_patterns):
            field = f"guard.redact_patterns[{i}]"
            try:
                pattern = re.compile(source)
            except re.error as exc:
                raise ConfigError(f"{field}: invalid regex: {exc}", field=field) from None
            if pattern.match("") is not None:  # it would redact between every two characters
                raise ConfigError(f"{field}: must not match the empty string", field=field)
            self.rules.append(_Rule(pattern, max_hold, block_hold))

    def sanitize(self, text: str) -> str:
        """The whole-text guard: drop `<think>` blocks, then redact every pattern."""
        if self.strip_think:
            text = _THINK_RE.sub("", text)
        return self.redact(text)

    def redact(self, text: str) -> str:
        out, pos = [], 0
        for start, end in self.matches(text, 0, len(text)):
            out += (text[pos:start], self.replacement)
            pos = end
        out.append(text[pos:])
        return "".join(out)

    def matches(self, text: str, pos: int, stop: int) -> Iterator[tuple[int, int]]:
        """Leftmost non-overlapping matches of all patterns starting in [pos, stop).

        One scan over all patterns (an earlier pattern wins a tie) rather than one `sub` per
        pattern: the replacement is never re-scanned and the stream needs one hold, not n.
        """
        found = [rule.pattern.search(text, pos) for rule in self.rules]
        while True:
            best = None
            for i, rule in enumerate(self.rules):
                if found[i] is not None and found[i].start() < pos:
                    found[i] = rule.pattern.search(text, pos)
                if found[i] is not None and (best is None or found[i].start() < best.start()):
                    best = found[i]
            if best is None or best.start() >= stop:
                return
            yield best.span()
            # An empty match (possible with lookarounds) must still move the scan on.
            pos = best.end() if best.end() > best.start() else best.start() + 1

    def stream(self) -> StreamGuard:
        return StreamGuard(self)


class StreamGuard:
    """Incremental `sanitize` for streamed deltas: emits what is settled, holds what may not be.

    Two stages, each exact on its own, so their chain is exact too:
    - think: outside a block, only a suffix that could be the start of `<think>`/`</think>`
      is held (at most 7 characters); inside one, text is dropped as it comes.
    - redact: the text is held from the earliest place where a match could still be in
      progress, and emitted (redacted) before it. Each pattern's literal start ("sk-",
      "bearer", "-----BEGIN", "AKIA") is read from the regex, so ordinary text is held only
      while it ends in a piece of such a start, or while a start it contains has not yet
      become a complete match (a match that stops before the buffer's end). A pattern whose
      start is not a literal holds its last `hold` characters: correct, only slower.
    A candidate is held at most `hold` characters (`max_hold`, or `block_hold` for PEM
    blocks), so memory and delay are bounded.

    Limits: a secret longer than its hold is settled early, so the part past the window
    leaks; a match is taken as final once a character follows it (a pattern with an
    optional tail such as `key(-x)?` may end up longer in `sanitize`); lookbehinds see only
    `CONTEXT` emitted characters. A false start ("risk-free" holds from "sk-") is released
    when its hold runs out, or at `flush`.
    """

    def __init__(self, guard: ResponseGuard) -> None:
        self._guard = guard
        self._inside = False  # within a <think> block
        self._tags = ""  # think stage: held text (a possible tag)
        self._buf = ""  # redact stage: CONTEXT emitted characters, then held text
        self._off = 0  # self._buf[:self._off] has been emitted already

    @property
    def held(self) -> int:
        """How many characters are waiting (for tests and metrics)."""
        return len(self._tags) + len(self._buf) - self._off

    def feed(self, delta: str) -> str:
        return self._redact(self._strip(delta, final=False), final=False)

    def flush(self) -> str:
        return self._redact(self._strip("", final=True), final=True)

    def _strip(self, delta: str, final: bool) -> str:
        if not self._guard.strip_think:
            return delta
        text, out = self._tags + delta, []
        while True:
            if self._inside:
                i = text.find(THINK_CLOSE)
                if i < 0:  # reasoning is dropped; keep only what may be a split closing tag
                    self._tags = "" if final else text[-(len(THINK_CLOSE) - 1) :]
                    return "".join(out)
                text, self._inside = text[i + len(THINK_CLOSE) :], False
                continue
            tag = _TAG_RE.search(text)
            if tag is None:
                keep = 0 if final else _partial_tag(text)
                out.append(text[: len(text) - keep])
                self._tags = text[len(text) - keep :]
                return "".join(out)
            out.append(text[: tag.start()])
            text, self._inside = text[tag.end() :], tag.group() == THINK_OPEN

    def _redact(self, text: str, final: bool) -> str:
        guard, buf = self._guard, self._buf + text
        stop = len(buf) if final else self._hold_from(buf)
        out, pos = [], self._off
        for start, end in guard.matches(buf, self._off, stop):
            out += (buf[pos:start], guard.replacement)
            pos = end
        cut = max(stop, pos)  # a match that began before `stop` is settled whole
        out.append(buf[pos:cut])
        keep = max(0, cut - CONTEXT)
        self._buf, self._off = buf[keep:], cut - keep
        return "".join(out)

    def _hold_from(self, buf: str) -> int:
        """The earliest position where a match may still be in progress (len(buf) if none)."""
        n = hold = len(buf)
        for rule in self._guard.rules:
            lo = max(self._off, n - rule.hold)  # older starts are settled (the window's limit)
            if rule.start is None:
                hold = min(hold, lo)
                continue
            found = rule.start.search(buf, lo)
            while found is not None and found.start() < hold:
                match = rule.pattern.match(buf, found.start())
                if match is None or match.end() >= n:  # may yet become, or grow, a secret
                    hold = found.start()
                    break
                found = rule.start.search(buf, found.start() + 1)
        return hold


def _partial_tag(text: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a think tag."""
    for k in range(min(len(text), len(THINK_CLOSE) - 1), 0, -1):
        if THINK_OPEN.startswith(text[-k:]) or THINK_CLOSE.startswith(text[-k:]):
            return k
    return 0
