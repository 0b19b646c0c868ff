"""Prompt and probe files, chat templates, and the token alignment of the runs with and without the prompt.

A prompt file is plain text (the whole file is the system prompt) or a structured JSON file::

    {"system": "Answer in French.", "examples": [{"user": "Hello", "assistant": "Bonjour"}]}

A probe file holds one query per line, or JSONL (one JSON string or ``{"query": ...}`` per line).

Chat models render both runs with their chat template: with the prompt, the system turn holds it (the
first user turn where the template has no system role) and the few-shot examples follow as turns; without
it, the template's own default applies. Base models (no chat template, or ``chat=False``) use plain
concatenation: ``lead + prompt + query``, where ``lead`` is the BOS token (EOS where there is no BOS) so
that both runs start with the same token, the attention sink.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from .errors import UsageError

__all__ = [
    "Prompt",
    "TokenPairs",
    "load_prompt",
    "load_probes",
    "default_probes",
    "align",
    "free_ids",
    "sha256_text",
]


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Prompt:
    """A system prompt plus optional few-shot (user, assistant) turns."""

    system: str
    examples: tuple[tuple[str, str], ...] = ()

    def canonical(self) -> str:
        """One string that identifies the prompt (its sha256 is the prompt hash)."""
        if not self.examples:
            return self.system
        return json.dumps({"system": self.system, "examples": [list(e) for e in self.examples]}, sort_keys=True)

    @property
    def sha256(self) -> str:
        return sha256_text(self.canonical())

    def as_text(self) -> str:
        """The prompt as plain text, for base models without a chat template."""
        shots = "".join(f"{u}\n{a}\n\n" for u, a in self.examples)
        sep = "\n\n" if self.system and shots else ""
        return f"{self.system}{sep}{shots}" if shots else self.system


def _read(path: str | Path, what: str) -> str:
    if str(path) == "-":
        return sys.stdin.read()
    p = Path(path)
    if not p.exists() or p.is_dir():
        raise UsageError(f"{what} {path}: no such file")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"{what} {path}: not UTF-8 text") from None


def parse_prompt(text: str, source: str = "prompt") -> Prompt:
    """Parse prompt text: JSON with ``system``/``examples`` when it is a JSON object, else plain text."""
    stripped = text.strip()
    if stripped.startswith("{"):
        try:
            data = json.loads(stripped)
        except json.JSONDecodeError as exc:
            raise UsageError(f"{source}: invalid JSON ({exc.msg} at line {exc.lineno})") from None
        unknown = set(data) - {"system", "examples"}
        if unknown:
            raise UsageError(f"{source}: unknown key(s) {sorted(unknown)}; expected 'system' and 'examples'")
        try:
            shots = tuple((str(e["user"]), str(e["assistant"])) for e in data.get("examples", []))
        except (KeyError, TypeError):
            raise UsageError(f"{source}: each example needs 'user' and 'assistant'") from None
        prompt = Prompt(str(data.get("system", "")), shots)
    else:
        prompt = Prompt(text.rstrip("\n"))
    if not prompt.system.strip() and not prompt.examples:
        raise UsageError(f"{source}: the prompt is empty")
    return prompt


def load_prompt(path: str | Path) -> Prompt:
    """Read a prompt file (``-`` for stdin)."""
    return parse_prompt(_read(path, "prompt file"), f"prompt file {path}")


def parse_probes(text: str, source: str = "probes") -> list[str]:
    queries = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if line.lstrip().startswith(("{", '"')):
            try:
                item = json.loads(line)
            except json.JSONDecodeError:
                raise UsageError(f"{source} line {n}: invalid JSON") from None
            if isinstance(item, dict):
                item = item.get("query", item.get("text", item.get("prompt")))
            if not isinstance(item, str):
                raise UsageError(f"{source} line {n}: expected a string or an object with 'query'")
            line = item
        queries.append(line)
    if not queries:
        raise UsageError(f"{source}: no queries (one per line, or JSONL)")
    return queries


def load_probes(path: str | Path | None) -> list[str]:
    """Read a probe/query file (``-`` for stdin); ``None`` gives the built-in default probes."""
    if path is None:
        return default_probes()
    return parse_probes(_read(path, "probe file"), f"probe file {path}")


def default_probes() -> list[str]:
    """The built-in probe set: varied generic user queries."""
    return parse_probes(resources.files("thoughtpatch").joinpath("data/probes.txt").read_text("utf-8"))


@dataclass
class TokenPairs:
    """Token ids of the runs with and without the prompt: ``prefix + query`` on each side.

    The query tokens (user turn, generation prompt and any teacher-forced answer tokens) are the same
    in both runs; the prefixes differ and are shared by all queries.
    """

    prefix_prompted: list[int]
    prefix_free: list[int]
    queries: list[list[int]]
    n_lead: int  # leading tokens both prefixes share (the attention sink among them)
    chat: bool
    answer_start: list[int] = field(default_factory=list)  # index in each query where answers begin

    def prompted(self, i: int) -> list[int]:
        return self.prefix_prompted + self.queries[i]

    def free(self, i: int) -> list[int]:
        return self.prefix_free + self.queries[i]

    def with_answers(self, answers: list[list[int]]) -> TokenPairs:
        return TokenPairs(
            self.prefix_prompted,
            self.prefix_free,
            [q + a for q, a in zip(self.queries, answers, strict=True)],
            self.n_lead,
            self.chat,
            [len(q) for q in self.queries],
        )


def _common_suffix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
        n += 1
    return n


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _render_chat(tokenizer, prompt: Prompt | None, query: str) -> str:
    turns = []
    for u, a in prompt.examples if prompt else ():
        turns += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
    turns.append({"role": "user", "content": query})
    if prompt is None or not prompt.system:
        return tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "system", "content": prompt.system}, *turns], add_generation_prompt=True, tokenize=False
        )
        if prompt.system in text:
            return text
    except Exception:  # templates without a system role raise
        pass
    turns[0] = {"role": "user", "content": f"{prompt.system}\n\n{turns[0]['content']}"}
    return tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def lead_tokens(tokenizer) -> list[int]:
    for tid in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return [tid]
    return []


def free_ids(tokenizer, query: str, chat: bool | None = None) -> list[int]:
    """Token ids of ``query`` alone, as the patched model sees it (template default, no prompt)."""
    chat = has_chat_template(tokenizer) if chat is None else chat
    if chat:
        return tokenizer(_render_chat(tokenizer, None, query), add_special_tokens=False)["input_ids"]
    return lead_tokens(tokenizer) + tokenizer(query, add_special_tokens=False)["input_ids"]


def align(tokenizer, prompt: Prompt, queries: list[str], chat: bool | None = None) -> TokenPairs:
    """Token ids of every query with and without the prompt, checked to be token-for-token identical."""
    chat = has_chat_template(tokenizer) if chat is None else chat
    if not queries:
        raise UsageError("no queries given")
    if not chat:
        lead = lead_tokens(tokenizer)
        pre = lead + tokenizer(prompt.as_text(), add_special_tokens=False)["input_ids"]
        qs = [tokenizer(q, add_special_tokens=False)["input_ids"] for q in queries]
        if any(not q for q in qs):
            raise UsageError("a query has no tokens (empty line?)")
        return TokenPairs(pre, list(lead), qs, len(lead), False)

    pre_c = pre_0 = None
    qs = []
    for q in queries:
        ids_0 = free_ids(tokenizer, q, True)
        ids_c = tokenizer(_render_chat(tokenizer, prompt, q), add_special_tokens=False)["input_ids"]
        if not _common_prefix(ids_c, ids_0):
            raise UsageError("the runs with and without the prompt share no leading token (chat template)")
        # The query region is the common tail; both prefixes keep at least the shared first token.
        s = min(_common_suffix(ids_c, ids_0), len(ids_0) - 1, len(ids_c) - 1)
        if q.strip() and q.strip() not in tokenizer.decode(ids_0[len(ids_0) - s :]):
            raise UsageError(
                f"the query tokens differ between the runs with and without the prompt ({q[:40]!r}): "
                "the chat template merges the prompt into the query; use --no-chat or a system prompt"
            )
        p_c, p_0 = ids_c[: len(ids_c) - s], ids_0[: len(ids_0) - s]
        if pre_c is None:
            pre_c, pre_0 = p_c, p_0
        elif (p_c, p_0) != (pre_c, pre_0):
            raise UsageError(f"the chat template renders the prompt differently for query {q[:40]!r}")
        qs.append(ids_0[len(ids_0) - s :])
    return TokenPairs(pre_c, pre_0, qs, _common_prefix(pre_c, pre_0), True)
