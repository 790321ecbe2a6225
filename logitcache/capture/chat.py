"""Chat corpora: conversations as typed values, and their rendering into tokens and a loss mask.

**Rows.** :func:`conversation_from_row` turns one row (a JSON object, a Parquet or dataset row) into a
:class:`Conversation`. Accepted shapes (:func:`row_shape`):

- ``messages``: a list of ``{"role", "content"}`` objects (roles are passed to the template as given);
- ``conversations`` (ShareGPT): a list of ``{"from", "value"}`` objects; ``from`` is mapped by
  :data:`SHAREGPT_ROLES` (``human`` → ``user``, ``gpt`` → ``assistant``, ``observation`` → ``tool``...);
- ``prompt`` + ``completion`` (as TRL takes them): two strings (one user turn, one assistant turn) or
  two message lists. Only the completion trains: earlier assistant turns inside the prompt are context.

A key whose value is null counts as absent (Arrow schemas give every row every column). A row holding
more than one shape, a ``text`` row, a message with keys beyond role and content, or a non-string field
raises :class:`CorpusError` naming the row's ``where`` and what was expected. Empty content is legal and
kept: an empty assistant turn still trains its end-of-turn token. A conversation without an assistant
turn to train is not an error: :attr:`Conversation.has_assistant` is False, and the caller skips and
counts it (rendering it gives a mask of zeros).

**Rendering.** :func:`render` applies the chat template (the tokenizer's own, or one given as text) and
tokenizes the rendered string exactly as ``apply_chat_template(tokenize=True)`` does. The mask is a
mask **over tokens**: ``mask[j]`` is True when token ``j`` is a trained label; position ``i`` (which
predicts token ``i + 1``) trains iff ``mask[i + 1]`` (:func:`trained_positions`). This is Hugging Face's
``labels`` convention: ``labels = where(mask, input_ids, -100)``. ``mask[0]`` is always False (nothing in
the sequence predicts token 0), so ``mask.sum()`` is the number of trained positions.

Which tokens train (``train_on``): ``assistant`` — every assistant turn; ``last-assistant`` — the last
one; ``all`` — every token but the first. An assistant turn's trained span is what the model generates
after the template's generation prompt: the text from the end of
``render(messages[:i], add_generation_prompt=True)`` to the end of ``render(messages[:i + 1])``, with
trailing whitespace removed. For ChatML that is ``content<|im_end|>``: the end-of-turn token trains
(the model must learn to stop), the ``"\\n"`` after it does not (generation stops at ``<|im_end|>``,
so that newline is never generated). The span is found by rendering prefixes, so templates without
``{% generation %}`` markers work, and each rendered prefix must be a prefix of the whole rendering
(else :class:`CorpusError`, never a guess). Character spans become tokens through the fast tokenizer's
offsets: a token trains if any of its characters lies in a trained span (a token straddling the
header and the content, e.g. ``"\\n\\n"``, trains). A template that raises (an unknown role) or drops a
message's text gives :class:`CorpusError` naming the row and the message's role.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..choices import TRAIN_ON
from ..errors import ConfigError, CorpusError

ROW_SHAPES = ("text", "messages", "sharegpt", "prompt-completion")
_SHAPE_KEYS = {"text": ("text",), "messages": ("messages",), "sharegpt": ("conversations",),
               "prompt-completion": ("prompt", "completion")}
SHAREGPT_ROLES = {
    "system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
    "chatgpt": "assistant", "tool": "tool", "observation": "tool", "function_response": "tool",
}
ASSISTANT = "assistant"


@dataclass(frozen=True)
class Message:
    role: str
    content: str


@dataclass(frozen=True)
class Conversation:
    """``messages`` in order; ``origin`` names the row (``data.jsonl:17``); messages before
    ``completion_start`` are prompt (context only, never trained; nonzero for prompt/completion rows)."""

    messages: tuple[Message, ...]
    origin: str
    completion_start: int = 0

    def trained_turns(self, train_on: str) -> list[int]:
        """Indices of the assistant messages that train under ``train_on`` (``all``: every assistant)."""
        turns = [i for i, m in enumerate(self.messages) if i >= self.completion_start and m.role == ASSISTANT]
        return turns[-1:] if train_on == "last-assistant" else turns

    @property
    def has_assistant(self) -> bool:
        return bool(self.trained_turns("assistant"))

    def as_dicts(self) -> list[dict[str, str]]:
        return [{"role": m.role, "content": m.content} for m in self.messages]


def row_shape(row: object, *, where: str) -> str:
    """The shape of ``row`` (one of :data:`ROW_SHAPES`); a file's rows must all have one shape."""
    if not isinstance(row, Mapping):
        raise CorpusError(f"{where}: found a {type(row).__name__}, expected an object with a 'messages', "
                          "'conversations' or 'prompt'/'completion' field")
    present = [s for s, keys in _SHAPE_KEYS.items() if any(row.get(k) is not None for k in keys)]
    if len(present) == 1:
        return present[0]
    if present:
        fields = " and ".join(repr(k) for s in present for k in _SHAPE_KEYS[s] if row.get(k) is not None)
        raise CorpusError(f"{where}: row has both {fields}; expected one of text, messages, conversations "
                          "or prompt/completion per row. Split the data into one kind per file")
    keys = ", ".join(map(repr, row)) or "none"
    raise CorpusError(f"{where}: row has no 'messages', 'conversations', 'prompt'/'completion' or 'text' "
                      f"field (keys: {keys}); expected one of them")


def conversation_from_row(row: object, *, where: str, shape: str | None = None) -> Conversation:
    """The conversation of ``row``. ``shape``: the shape the file's earlier rows had (refused if it differs)."""
    found = row_shape(row, where=where)
    if shape is not None and found != shape:
        raise CorpusError(f"{where}: this is a {found!r} row but earlier rows of the file are {shape!r} rows; "
                          "expected one kind of row per file. Split the file")
    if found == "text":
        raise CorpusError(f"{where}: a 'text' row is not a conversation; expected 'messages', 'conversations' "
                          "or 'prompt'/'completion'. Text corpora are read as documents, not chats")
    if found == "messages":
        return Conversation(_messages(row["messages"], f"{where} 'messages'"), where)
    if found == "sharegpt":
        return Conversation(_sharegpt(row["conversations"], f"{where} 'conversations'"), where)
    return _prompt_completion(row, where)


def _message_list(value: object, where: str) -> list:
    if not isinstance(value, (list, tuple)):
        raise CorpusError(f"{where}: found a {type(value).__name__}, expected a list of messages")
    return list(value)


def _fields(item: object, keys: tuple[str, str], where: str) -> tuple[str, str]:
    """The two string fields ``keys`` of one message; other non-null keys are refused, never dropped."""
    if not isinstance(item, Mapping):
        raise CorpusError(f"{where}: found a {type(item).__name__}, expected an object with {keys[0]!r} and "
                          f"{keys[1]!r}")
    extra = sorted(k for k, v in item.items() if k not in keys and v is not None)
    if extra:
        raise CorpusError(f"{where}: has keys {', '.join(map(repr, extra))} that logitcache does not render; "
                          f"expected only {keys[0]!r} and {keys[1]!r}. Fold them into the content or drop them")
    for key in keys:
        if item.get(key) is None:
            raise CorpusError(f"{where}: has no {key!r} (keys: {', '.join(map(repr, item)) or 'none'}); "
                              f"expected {keys[0]!r} and {keys[1]!r} strings")
        if not isinstance(item[key], str):
            raise CorpusError(f"{where}: {key!r} is a {type(item[key]).__name__} ({item[key]!r:.60}), "
                              "expected a string")
    if not item[keys[0]]:
        raise CorpusError(f"{where}: {keys[0]!r} is empty, expected a role name")
    return item[keys[0]], item[keys[1]]


def _messages(value: object, where: str) -> tuple[Message, ...]:
    items = _message_list(value, where)
    return tuple(Message(*_fields(item, ("role", "content"), f"{where} message {i}")) for i, item in enumerate(items))


def _sharegpt(value: object, where: str) -> tuple[Message, ...]:
    messages = []
    for i, item in enumerate(_message_list(value, where)):
        speaker, text = _fields(item, ("from", "value"), f"{where} message {i}")
        if speaker not in SHAREGPT_ROLES:
            raise CorpusError(f"{where} message {i}: unknown ShareGPT speaker {speaker!r}; expected one of "
                              f"{', '.join(SHAREGPT_ROLES)}. Convert the row to 'messages' with explicit roles")
        messages.append(Message(SHAREGPT_ROLES[speaker], text))
    return tuple(messages)


def _prompt_completion(row: Mapping, where: str) -> Conversation:
    prompt, completion = row.get("prompt"), row.get("completion")
    for name, value in (("prompt", prompt), ("completion", completion)):
        if value is None:
            raise CorpusError(f"{where}: row has no {name!r} field; a prompt/completion row needs both "
                              "(strings, or lists of messages)")
    if isinstance(prompt, str) and isinstance(completion, str):
        return Conversation((Message("user", prompt), Message(ASSISTANT, completion)), where, completion_start=1)
    if isinstance(prompt, str) or isinstance(completion, str):
        raise CorpusError(f"{where}: 'prompt' is a {type(prompt).__name__} but 'completion' is a "
                          f"{type(completion).__name__}; expected both strings or both lists of messages")
    head = _messages(prompt, f"{where} 'prompt'")
    return Conversation(head + _messages(completion, f"{where} 'completion'"), where, completion_start=len(head))


@dataclass(frozen=True)
class RenderedChat:
    """A rendered conversation: ``input_ids`` (int32) and ``mask`` (bool, same length; ``mask[j]``: token
    ``j`` is a trained label), and the sha256 of the template that rendered it."""

    input_ids: np.ndarray
    mask: np.ndarray
    template_sha256: str

    @property
    def trained(self) -> int:
        """Number of trained positions (0: nothing to train, the caller skips the conversation)."""
        return int(self.mask.sum())

    def labels(self) -> np.ndarray:
        """Hugging Face labels: the token where it trains, else -100 (the model shifts them itself)."""
        return np.where(self.mask, self.input_ids.astype(np.int64), -100)


def trained_positions(mask: np.ndarray) -> np.ndarray:
    """Per-position targets from a token mask: position ``i`` (predicting token ``i + 1``) trains iff
    ``mask[i + 1]``. Length ``len(mask) - 1``, one entry per position that has a label."""
    return np.asarray(mask, dtype=bool)[1:]


def read_chat_template(path: str | Path) -> str:
    """The text of a Jinja chat template file (strict UTF-8)."""
    file = Path(path)
    try:
        return file.read_bytes().decode("utf-8")
    except FileNotFoundError as exc:
        raise ConfigError(f"chat template file {str(file)!r} does not exist; expected a Jinja template file") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"chat template {str(file)!r}: byte offset {exc.start} is not valid UTF-8; "
                          "expected UTF-8 text") from exc


def resolve_chat_template(tokenizer: Any, chat_template: str | None) -> str:
    """``chat_template`` if given, else the tokenizer's own; an error says what to pass when neither exists."""
    template = chat_template if chat_template is not None else getattr(tokenizer, "chat_template", None)
    if isinstance(template, Mapping):  # named templates: the default one renders chats
        template = template.get("default")
    if not template:
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ConfigError(f"the tokenizer {name!r} has no chat template, so a chat corpus cannot be rendered; "
                          "pass one with --chat-template FILE (a Jinja template, e.g. the teacher family's "
                          "chat_template.jinja)")
    return template


def template_sha256(template: str) -> str:
    return hashlib.sha256(template.encode("utf-8")).hexdigest()


def render(conversation: Conversation, tokenizer: Any, *, chat_template: str | None = None,
           train_on: str = "assistant") -> RenderedChat:
    """Tokens and token mask of ``conversation`` under the chat template (see the module docstring).

    ``tokenizer``: a fast Hugging Face tokenizer. ``chat_template``: template text (default: the
    tokenizer's). ``train_on``: one of :data:`~logitcache.choices.TRAIN_ON`.
    """
    if train_on not in TRAIN_ON:
        raise ConfigError(f"train_on must be one of {', '.join(TRAIN_ON)}; found {train_on!r}")
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError("rendering a chat needs a fast tokenizer (its offsets map text to tokens); "
                          f"found {type(tokenizer).__name__}")
    template = resolve_chat_template(tokenizer, chat_template)
    text = apply_template(tokenizer, conversation, len(conversation.messages), template)
    turns = conversation.trained_turns(train_on)
    spans = [] if train_on == "all" else [_turn_span(tokenizer, conversation, i, template, text) for i in turns]
    _check_verbatim(conversation, text, skip=set(conversation.trained_turns("assistant")) - set(turns))
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(encoded["input_ids"], dtype=np.int32)
    offsets = np.asarray(encoded["offset_mapping"], dtype=np.int64).reshape(len(ids), 2)
    mask = np.ones(len(ids), dtype=bool) if train_on == "all" else _span_mask(offsets, spans, conversation.origin)
    mask[:1] = False
    return RenderedChat(input_ids=ids, mask=mask, template_sha256=template_sha256(template))


def apply_template(tokenizer: Any, conversation: Conversation, count: int, template: str,
                   generation: bool = False) -> str:
    """The template's text for the first ``count`` messages (with the generation prompt after them when
    ``generation``); a template error names the row and role."""
    try:
        return tokenizer.apply_chat_template(conversation.as_dicts()[:count], chat_template=template,
                                             tokenize=False, add_generation_prompt=generation)
    except Exception as exc:  # jinja2's TemplateError (raise_exception), or what a template's filters raise
        culprit = _first_refused(tokenizer, conversation, template)
        raise CorpusError(f"{conversation.origin}: the chat template refused {culprit}: {exc}. Map or drop that "
                          "role, or pass a template that accepts it with --chat-template FILE") from exc


def _first_refused(tokenizer: Any, conversation: Conversation, template: str) -> str:
    """Name the first message whose prefix the template cannot render (only on the error path)."""
    for k, message in enumerate(conversation.messages):
        try:
            tokenizer.apply_chat_template(conversation.as_dicts()[:k + 1], chat_template=template, tokenize=False)
        except Exception:
            return f"message {k} (role {message.role!r})"
    return "the conversation"


def _check_verbatim(conversation: Conversation, text: str, skip: set[int]) -> None:
    """Every message's text must appear in the rendering: a template that drops a role is refused.
    ``skip``: earlier assistant turns under ``last-assistant``, which templates may rewrite on purpose
    (Qwen3's drops their reasoning); they are context there, not trained."""
    for k, message in enumerate(conversation.messages):
        if k not in skip and message.content.strip() not in text:
            raise CorpusError(f"{conversation.origin}: the chat template dropped or rewrote message {k} (role "
                              f"{message.role!r}); expected its content in the rendered text. Use a template that "
                              "renders this role, or drop those messages")


def _turn_span(tokenizer: Any, conversation: Conversation, i: int, template: str, text: str) -> tuple[int, int]:
    """Character span of assistant message ``i`` in ``text``: after the generation prompt, to the end of
    its rendering without trailing whitespace."""
    where = f"{conversation.origin} message {i}"
    if i == 0:
        raise CorpusError(f"{where}: the conversation opens with an assistant turn, so there is no prefix to "
                          "render its generation prompt from; expected a system or user turn before it")
    prompt = apply_template(tokenizer, conversation, i, template, generation=True)
    turn = apply_template(tokenizer, conversation, i + 1, template)
    if not (text.startswith(prompt) and text.startswith(turn) and len(turn) >= len(prompt)):
        raise CorpusError(f"{where}: the chat template renders this conversation's prefix differently from the "
                          "whole conversation (it is not prefix-stable, e.g. it rewrites earlier assistant turns), "
                          "so the assistant tokens cannot be located; use train_on 'last-assistant' or another "
                          "template")
    start, end = len(prompt), max(len(prompt), len(turn.rstrip()))
    if conversation.messages[i].content.strip() not in text[start:end]:
        raise CorpusError(f"{where}: the assistant content is not inside the text the template adds after its "
                          "generation prompt; expected the template to render the turn after that prompt")
    return start, end


def _span_mask(offsets: np.ndarray, spans: list[tuple[int, int]], where: str) -> np.ndarray:
    """Tokens whose characters overlap a span; every character of a span must be covered by a token."""
    starts, ends = offsets[:, 0], offsets[:, 1]
    mask = np.zeros(len(offsets), dtype=bool)
    for start, end in spans:
        if start == end:
            continue
        hit = (starts < end) & (ends > start)
        reach = np.maximum.accumulate(ends[hit]) if hit.any() else ends[hit]
        if not hit.any() or starts[hit][0] > start or reach[-1] < end or np.any(starts[hit][1:] > reach[:-1]):
            raise CorpusError(f"{where}: the tokenizer's offsets do not cover characters {start}..{end} of the "
                              "rendered text; expected a fast tokenizer whose offsets span the text")
        mask |= hit
    return mask


_PYDOC_QUESTIONS = (
    "What does the Python documentation say about `{topic}`?",
    "Explain the Python help topic \"{topic}\".",
    "Show me the pydoc entry for {topic}, please.",
)
_PYDOC_SYSTEM = "You are a helpful assistant that answers with the Python reference documentation."


def pydoc_chat_rows() -> Iterator[tuple[str, dict]]:
    """``builtin:pydoc-chat``: one ``(origin, row)`` per ``pydoc_data.topics`` topic, sorted by name; the
    row's ``messages`` ask about the topic (one of three phrasings) and answer with the topic's text; every
    third row opens with a system turn. Deterministic; the text follows the running Python version."""
    from pydoc_data.topics import topics

    for n, key in enumerate(sorted(topics)):
        question = {"role": "user", "content": _PYDOC_QUESTIONS[n % len(_PYDOC_QUESTIONS)].format(topic=key)}
        answer = {"role": ASSISTANT, "content": topics[key].strip()}
        system = [{"role": "system", "content": _PYDOC_SYSTEM}] if n % 3 == 2 else []
        yield f"pydoc-chat:{key}", {"messages": [*system, question, answer]}


__all__ = ["ROW_SHAPES", "SHAREGPT_ROLES", "Conversation", "Message", "RenderedChat", "apply_template",
           "conversation_from_row",
           "pydoc_chat_rows", "read_chat_template", "render", "resolve_chat_template", "row_shape",
           "template_sha256", "trained_positions"]
