"""``logitcache export-generations``, and the lines ``inspect`` prints for a store of teacher-generated responses."""

from __future__ import annotations

import json

import click


@click.command("export-generations")
@click.argument("store")
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--corpus", help="The corpus the store was captured from (default: the manifest's corpus.source).")
@click.option("--chat-template", type=click.Path(dir_okay=False), help="The template file the capture used, if any.")
@click.option("--tokenizer", help="The teacher's directory (default: the manifest's teacher).")
def export_generations_command(store, out, corpus, chat_template, tokenizer) -> None:
    """Write the teacher-generated responses of STORE to OUT as JSONL: messages with the response as the
    assistant turn, finish reason and token counts (a plain SFT dataset)."""
    from ..capture.export import export_generations as run_export

    s = run_export(store, out, corpus=corpus, chat_template=chat_template, tokenizer=tokenizer)
    click.echo(f"exported {s.responses} responses to {s.path} (finish reasons: "
               + ", ".join(f"{k} {v}" for k, v in s.finish_reasons.items()) + ")")


def generation_lines(g: dict | None, stats: dict) -> list[str]:
    """A generated store's settings, its prompts and what its responses did (``inspect``'s generation section)."""
    if not g:
        return []
    settings = {k: v for k, v in g["settings"].items() if k != "stop_token_ids"}
    skipped = [f"{k.replace('_', ' ')} {stats[k]}" for k in ("prompts_without_user", "empty_prompts",
                                                              "skipped_long_prompts") if stats.get(k)]
    prompts = ", ".join([f"{stats['prompts']} ({stats['prompt_tokens']} tokens)", *skipped])
    lines = [f"  generation     {json.dumps(settings)}", f"  prompts        {prompts}"]
    if "responses" in g:
        hits = ", ".join(f"{s!r} {n}" + (" (never occurred)" if not n else "")
                         for s, n in g["stop_string_hits"].items())
        finish = ", ".join(f"{k} {v}" for k, v in g["finish_reasons"].items())
        lines.append(f"  responses      {g['responses']}, mean {g['mean_response_tokens']:.1f} tokens, max "
                     f"{g['max_response_tokens']}; finish {finish}" + (f"; stop strings {hits}" if hits else ""))
    return lines
