"""Teacher-generated responses: prompts from a chat corpus, ``n`` responses each, captured in one job.

**Prompts.** Each row of a chat corpus (:mod:`logitcache.capture.chat` reads it) gives one prompt: its
messages up to and including the last user turn (of a prompt/completion row: the prompt's; the
completion is not used), rendered with the chat template and ``add_generation_prompt=True``, tokenized as
:func:`chat.render` tokenizes. Skipped and counted in :attr:`GenerationPlan.stats`: a row without a user
turn (``prompts_without_user``), one whose last user turn is empty or blank (``empty_prompts``), and a
prompt over ``seq_len + 1 - max_new_tokens`` tokens (``skipped_long_prompts``: no room for a whole
response; prompts are never cut). ``max_tokens`` keeps prompts until their tokens reach it. A text corpus
is refused: generation needs conversations.

**Sequences.** Prompt ``j`` gives sequences ``j·n .. j·n + n - 1``; sequence ``i`` has id
:func:`~logitcache.capture.plan.seq_id_for` ``(fingerprint, seq_len, i, layout="generate")`` and its
response is sampled with the seed :func:`generation_seed` ``(seed, seq_id)``, so what is generated
depends on the sequence alone (not on units, batches, restarts or workers). The stored sequence is
prompt + response (the stop token kept); its mask covers exactly the positions that predict response
tokens. The store is a ``documents`` store whose rows also carry a finish reason.

The corpus fingerprint is the one the documents layout computes (every row's canonical JSON).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from . import chat
from .config import CaptureConfig, GenerateConfig
from .corpus import Corpus
from .documents import LayoutSection, Sequence
from .plan import Unit, seq_id_for
from ..errors import CorpusError, TeacherError
from ..store.finish import finish_code

LAYOUT = "generate"  # the seq-id key; the store's layout is "documents"
_MASK63 = (1 << 63) - 1


@dataclass(frozen=True)
class GenerationLayout(LayoutSection):
    """The manifest's ``corpus.layout`` of generated responses: the documents fields plus ``generate``
    (the settings and the stop token ids), compared on resume like any layout field."""

    generate: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {**super().to_dict(), "generate": self.generate}


@dataclass(frozen=True, eq=False)
class GenerationPlan:
    """Sequences ``first .. first + num_sequences - 1`` of a generation plan: their prompts end to end.

    ``prompts int32[sum P_j]`` with ``offsets int64[J + 1]`` hold prompts ``first_prompt .. first_prompt + J - 1``
    (read-only); sequence ``i`` generates from prompt ``i // n``. :meth:`slice` gives a unit's part.
    """

    prompts: np.ndarray
    offsets: np.ndarray
    n: int
    num_sequences: int
    seq_len: int
    max_new_tokens: int
    corpus_fingerprint: str
    layout: GenerationLayout
    stop_ids: tuple[int, ...]
    stats: dict = field(default_factory=dict)
    first: int = 0

    @property
    def tokens(self) -> np.ndarray:
        """The prompts' tokens (what the rank-delta id order is counted from: responses are not known yet)."""
        return self.prompts

    @property
    def positions(self) -> int:
        """The most trained positions the plan can hold (``max_new_tokens`` per response); units record theirs."""
        return self.num_sequences * self.max_new_tokens

    def prompt(self, i: int) -> np.ndarray:
        """The prompt tokens of sequence ``i``."""
        if not self.first <= i < self.first + self.num_sequences:
            raise IndexError(f"sequence {i} is outside this plan's {self.first}..{self.first + self.num_sequences - 1}")
        j = i // self.n - self.first // self.n
        return self.prompts[int(self.offsets[j]):int(self.offsets[j + 1])]

    def seq_id(self, i: int) -> int:
        return seq_id_for(self.corpus_fingerprint, self.seq_len, i, layout=LAYOUT)

    def slice(self, unit: Unit) -> GenerationPlan:
        """The sequences of ``unit`` only (and their prompts), indexed as in this plan."""
        base = self.first // self.n
        lo, hi = unit.start // self.n - base, (unit.stop - 1) // self.n - base + 1
        t0, t1 = int(self.offsets[lo]), int(self.offsets[hi])
        return GenerationPlan(np.array(self.prompts[t0:t1]), self.offsets[lo:hi + 1] - t0, self.n, unit.size,
                              self.seq_len, self.max_new_tokens, self.corpus_fingerprint, self.layout, self.stop_ids,
                              {}, unit.start)


@dataclass(frozen=True)
class Prompt:
    """One prompt of a chat corpus: where it came from, its messages and its tokens."""

    origin: str
    messages: tuple[chat.Message, ...]
    tokens: np.ndarray


def build_generation_plan(corpus: Corpus, tokenizer, *, seq_len: int, max_tokens: int | None,
                          settings: GenerateConfig, chat_template: str | None,
                          stop_ids: tuple[int, ...]) -> GenerationPlan:
    """The generation plan of ``corpus`` (see the module docstring); ``chat_template``: template text or None
    (the tokenizer's). Raises :class:`CorpusError` when no prompt remains, naming what was skipped."""
    reader = PromptReader(corpus, tokenizer, chat_template, room=seq_len + 1 - settings.max_new_tokens)
    kept = [p.tokens for p in reader.kept(max_tokens)]
    tokens = sum(p.size for p in kept)
    stats = {"documents": reader.read, "prompts": len(kept), "sequences": len(kept) * settings.n,
             "prompt_tokens": tokens, **reader.stats}
    if not kept:
        found = ", ".join(f"{k} {v}" for k, v in stats.items() if v) or "no rows"
        raise CorpusError(f"no row of {corpus.source} gives a prompt to generate from ({found}); expected at least "
                          "one conversation whose last user turn has text and fits seq_len + 1 - max_new_tokens "
                          f"= {reader.room} tokens. Check the corpus, --seq-len and --generate-max-new-tokens")
    prompts = np.concatenate(kept).astype(np.int32)
    offsets = np.concatenate([[0], np.cumsum([p.size for p in kept])]).astype(np.int64)
    prompts.flags.writeable = False
    layout = GenerationLayout("documents", "skip", "response", chat.template_sha256(reader.template),
                              {**settings.to_dict(), "stop_token_ids": list(stop_ids)})
    return GenerationPlan(prompts, offsets, settings.n, len(kept) * settings.n, seq_len, settings.max_new_tokens,
                          reader.hasher.hexdigest(), layout, tuple(stop_ids), stats)


class PromptReader:
    """Chat rows → :class:`Prompt` values (module docstring); hashes every row as the documents layout does."""

    def __init__(self, corpus: Corpus, tokenizer, chat_template: str | None, *, room: int) -> None:
        if not corpus.chat:
            raise CorpusError(f"{corpus.source} holds text, not conversations; generating responses needs prompts: "
                              "a chat corpus (messages, conversations or prompt/completion rows)")
        self.corpus, self.tokenizer, self.room = corpus, tokenizer, room
        self.template = chat.resolve_chat_template(tokenizer, chat_template)
        self.hasher = hashlib.sha256()
        self.read = 0
        self.stats = {"prompts_without_user": 0, "empty_prompts": 0, "skipped_long_prompts": 0}

    def prompts(self, stop=lambda: False) -> Iterator[Prompt]:
        """Every prompt kept, in corpus order; every row is read and hashed, also once ``stop()`` holds."""
        shape = None
        for origin, row in self.corpus.rows():
            self.read += 1
            data = json.dumps(row, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str).encode()
            self.hasher.update(len(data).to_bytes(8, "little"))
            self.hasher.update(data)
            if stop():
                continue
            shape = shape or chat.row_shape(row, where=origin)
            prompt = self._prompt(chat.conversation_from_row(row, where=origin, shape=shape))
            if prompt is not None:
                yield prompt

    def kept(self, max_tokens: int | None) -> list[Prompt]:
        """The plan's prompts: all of them, or with ``max_tokens`` those before their tokens reach it."""
        kept, tokens = [], 0
        for prompt in self.prompts(stop=lambda: max_tokens is not None and tokens >= max_tokens):
            kept.append(prompt)
            tokens += prompt.tokens.size
        return kept

    def _prompt(self, conversation: chat.Conversation) -> Prompt | None:
        head = conversation.messages[:conversation.completion_start or len(conversation.messages)]
        users = [i for i, m in enumerate(head) if m.role == "user"]
        if not users:
            self.stats["prompts_without_user"] += 1
            return None
        messages = head[:users[-1] + 1]
        if not messages[-1].content.strip():
            self.stats["empty_prompts"] += 1
            return None
        prompt = chat.Conversation(messages, conversation.origin)
        text = chat.apply_template(self.tokenizer, prompt, len(messages), self.template, generation=True)
        if text == chat.apply_template(self.tokenizer, prompt, len(messages), self.template):
            raise CorpusError(f"{conversation.origin}: the chat template adds nothing for add_generation_prompt, so "
                              "the teacher would not be asked to answer as the assistant; pass a template that "
                              "renders a generation prompt with --chat-template FILE")
        ids = np.asarray(self.tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int32)
        if ids.size > self.room:
            self.stats["skipped_long_prompts"] += 1
            return None
        return Prompt(conversation.origin, messages, ids)


def generation_seed(seed: int, seq_id: int) -> int:
    """The 63-bit seed a response is sampled with: blake2b of ``(seed, seq_id)``, apart from the capture's draws."""
    digest = hashlib.blake2b(f"logitcache/generate/{int(seed)}/{int(seq_id)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & _MASK63


def response_sequence(prompt: np.ndarray, response: np.ndarray, max_new_tokens: int) -> Sequence:
    """Prompt + response as one sequence, its mask on exactly the positions that predict response tokens."""
    if not 1 <= response.size <= max_new_tokens:
        raise TeacherError(f"the teacher returned a response of {response.size} tokens; expected 1 to "
                           f"max_new_tokens = {max_new_tokens}")
    tokens = np.concatenate([prompt, response]).astype(np.int32)
    mask = np.zeros(tokens.size - 1, dtype=bool)
    mask[prompt.size - 1:] = True
    return Sequence(tokens, mask)


@dataclass(frozen=True)
class GeneratedUnit:
    """A unit's sequences once generated: ids, prompt + response sequences, finish codes (store encoding)."""

    seq_ids: list[int]
    sequences: list[Sequence]
    finish: list[int]


def generate_unit(teacher, plan: GenerationPlan, unit: Unit, config: CaptureConfig) -> GeneratedUnit:
    """The teacher's responses for the sequences of ``unit`` (the capture of their targets follows)."""
    indices = range(unit.start, unit.stop)
    seq_ids = [plan.seq_id(i) for i in indices]
    prompts = [plan.prompt(i) for i in indices]
    generations = teacher.generate([torch.from_numpy(p.astype(np.int64)) for p in prompts], config.generate,
                                   [generation_seed(config.seed, s) for s in seq_ids], plan.stop_ids)
    sequences = [response_sequence(p, g.tokens, plan.max_new_tokens) for p, g in zip(prompts, generations, strict=True)]
    return GeneratedUnit(seq_ids, sequences, [finish_code(g.finish, g.stop_string) for g in generations])


__all__ = ["GeneratedUnit", "GenerationLayout", "GenerationPlan", "Prompt", "PromptReader", "build_generation_plan",
           "generate_unit", "generation_seed", "response_sequence"]
