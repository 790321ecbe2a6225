"""``logitcache export-generations``: a store of teacher-generated responses as a plain SFT dataset (JSONL).

One line per stored response, in sequence order::

    {"messages": [...the prompt's messages..., {"role": "assistant", "content": "<response text>"}],
     "finish_reason": "stop" | "length" | "stop-string", "stop_string": "..." (stop-string only),
     "prompt_tokens": P, "completion_tokens": R, "seq_id": ...}

The prompt's messages come from the corpus (the manifest's ``corpus.source``, or ``corpus`` given), re-read
as the capture read it and checked against the manifest's fingerprint and chat template; so a line holds
the conversation exactly as the corpus held it. The response text is the stored response tokens decoded
with the teacher's tokenizer (special tokens kept), without the final stop token when the response ended on
one (``finish_reason`` stop; the chat template adds the end of turn again). ``completion_tokens`` counts
the stored response tokens, stop token included. Decoding then re-tokenizing text need not give the same
tokens: the store, not this file, holds the exact sequences the targets belong to.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .chat import read_chat_template, template_sha256
from .corpus import open_corpus
from .generate import Prompt, PromptReader
from ..errors import ConfigError, CorpusError
from ..models.tokenizers import tokenizer_fingerprints
from ..store.commit import as_fs, read_manifest
from ..store.generations import GeneratedRow, unit_rows
from ..store.reader import read_unit
from ..store.manifest import generation_settings
from ..store.spec import spec_from_manifest


@dataclass(frozen=True)
class ExportSummary:
    path: str
    responses: int
    finish_reasons: dict[str, int]


def iter_generated(root, *, check: bool = True) -> Iterator[GeneratedRow]:
    """Every committed response of a generated store, in sequence order (``check``: verify checksums first)."""
    fs = as_fs(root)
    manifest = read_manifest(fs)
    spec = spec_from_manifest(manifest.header)
    stops = len((generation_settings(manifest.header) or {}).get("stop", []))
    for record in sorted(manifest.shards, key=lambda r: r.index):
        yield from unit_rows(spec, record.index, read_unit(fs, spec, record, check=check), stops)


def export_generations(store: str, out: str | os.PathLike, *, corpus: str | None = None,
                       chat_template: str | None = None, tokenizer: str | None = None) -> ExportSummary:
    """Write the responses of ``store`` to ``out`` (JSONL, see the module docstring); ``corpus`` (default: the
    manifest's source), ``chat_template`` (a template file, if the capture used one) and ``tokenizer`` (a
    directory; default: the manifest's teacher) must be what the capture read."""
    header = read_manifest(store).header
    settings = generation_settings(header)
    if settings is None:
        raise ConfigError(f"store {store} holds no teacher-generated responses (no corpus.layout.generate in its "
                          "manifest); export-generations needs a store captured with --generate-max-new-tokens")
    tok = _tokenizer(tokenizer or header.teacher["name"], header.tokenizer.fingerprint)
    prompts = _prompts(header, tok, corpus, chat_template, settings)
    counts = {"stop": 0, "length": 0, "stop-string": 0}
    target = Path(out)
    partial = target.with_name(target.name + ".partial")
    with open(partial, "w", encoding="utf-8") as f:
        for row in iter_generated(store):
            prompt = prompts[row.index // settings["n"]]
            if row.tokens[:row.prompt_length].tolist() != prompt.tokens.tolist():
                raise CorpusError(f"store {store} sequence {row.index}: its prompt tokens are not those of "
                                  f"{prompt.origin}; expected the corpus and template the capture read")
            f.write(json.dumps(_line(row, prompt, tok, settings), ensure_ascii=False) + "\n")
            counts[row.finish] += 1
    os.replace(partial, target)
    return ExportSummary(str(target), sum(counts.values()), counts)


def _line(row: GeneratedRow, prompt: Prompt, tokenizer, settings: dict) -> dict:
    response = row.response[:-1] if row.finish == "stop" else row.response
    text = tokenizer.decode(response.tolist(), skip_special_tokens=False)
    line = {"messages": [*({"role": m.role, "content": m.content} for m in prompt.messages),
                         {"role": "assistant", "content": text}],
            "finish_reason": row.finish}
    if row.stop_string is not None:
        line["stop_string"] = settings["stop"][row.stop_string]
    return {**line, "prompt_tokens": row.prompt_length, "completion_tokens": int(row.response.size),
            "seq_id": row.seq_id}


def _tokenizer(name: str, fingerprint: str):
    from transformers import AutoTokenizer

    from ..models.embedded import resolve_teacher_path

    tok = AutoTokenizer.from_pretrained(resolve_teacher_path(name), local_files_only=True)
    forms = tokenizer_fingerprints(tok)
    if fingerprint not in forms:
        raise ConfigError(f"the tokenizer of {name} is not the one the store was captured with (fingerprint "
                          f"{forms[0][:12]}…, the store's {fingerprint[:12]}…); pass the teacher's "
                          "with --tokenizer DIR")
    return tok


def _prompts(header, tokenizer, corpus: str | None, chat_template: str | None, settings: dict) -> list[Prompt]:
    """The plan's prompts, re-read from the corpus and checked against the manifest."""
    c, layout = header.identity["corpus"], header.corpus["layout"]
    source = corpus or header.corpus["source"]
    template = None if chat_template is None else read_chat_template(chat_template)
    reader = PromptReader(open_corpus(source, text_field=c["text_field"], split=c["split"]), tokenizer, template,
                          room=header.seq_len + 1 - settings["max_new_tokens"])
    if template_sha256(reader.template) != layout["chat_template_sha256"]:
        which = "given" if chat_template else "of the tokenizer"
        raise ConfigError(f"the chat template {which} is not the one the store was captured with (sha256 differs); "
                          "pass the capture's with --chat-template FILE")
    prompts = reader.kept(c.get("max_tokens"))
    if reader.hasher.hexdigest() != header.corpus["fingerprint"]:
        raise CorpusError(f"corpus {source} is not the one the store was captured from (its fingerprint differs); "
                          "pass the capture's corpus with --corpus SOURCE")
    return prompts


__all__ = ["ExportSummary", "export_generations", "iter_generated"]
