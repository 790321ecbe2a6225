"""Command-line entry points: ``logitcache capture | inspect | verify | convert | export-generations | train``.

``capture`` reads an optional YAML config (``--config``); flags given on the command line
override it field by field.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import click

from ..capture.config import CaptureConfig
from ..choices import (ALLOCATIONS, BACKENDS, DTYPES, ENTROPY_CODECS, FORMATS, ID_CHOICES, LAYOUTS, LOGPROB_DTYPES,
                       LONG_SEQUENCES, METHODS, TRAIN_ON)
from ..jobfile import read_job_file
from ..errors import LogitCacheError

# flag name -> dotted config field
CAPTURE_FLAGS = {
    "teacher": "teacher.model",
    "backend": "teacher.backend",
    "device": "teacher.device",
    "dtype": "teacher.dtype",
    "trust_remote_code": "teacher.trust_remote_code",
    "head_chunk": "teacher.head_chunk",
    "corpus": "corpus.source",
    "text_field": "corpus.text_field",
    "split": "corpus.split",
    "seq_len": "corpus.seq_len",
    "max_tokens": "corpus.max_tokens",
    "layout": "corpus.layout",
    "long_sequences": "corpus.long_sequences",
    "train_on": "corpus.train_on",
    "chat_template": "corpus.chat_template",
    "generate_max_new_tokens": "generate.max_new_tokens",
    "generate_temperature": "generate.temperature",
    "generate_top_p": "generate.top_p",
    "generate_top_k": "generate.top_k",
    "generate_n": "generate.n",
    "generate_stop": "generate.stop",
    "method": "sparsify.method",
    "k": "sparsify.k",
    "samples": "sparsify.samples",
    "temperature": "sparsify.temperature",
    "sample_allocation": "sparsify.allocation",
    "out": "store.path",
    "sequences_per_shard": "store.sequences_per_shard",
    "logprob_dtype": "store.logprob_dtype",
    "format": "store.format",
    "ids": "store.ids",
    "entropy": "store.entropy",
    "label_logprobs": "store.label_logprobs",
    "compression_level": "store.compression_level",
    "seed": "seed",
    "batch_tokens": "batch_tokens",
    "workers": "workers",
    "encode_threads": "encode_threads",
}


def parse_engine_args(pairs: tuple[str, ...]) -> dict | None:
    """``("tensor_parallel_size=8", "enforce_eager=true")`` → ``{"tensor_parallel_size": 8, "enforce_eager": True}``."""
    import yaml

    if not pairs:
        return None
    engine = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected KEY=VALUE (e.g. tensor_parallel_size=8); found {pair!r}",
                                     param_hint="--engine")
        engine[key.strip()] = yaml.safe_load(value)
    return engine


def load_config(path: str | None, overrides: dict) -> CaptureConfig:
    """A CaptureConfig from an optional YAML file plus flag overrides (``None`` = not given)."""
    data = read_job_file(path, "capture") if path else {}
    config = CaptureConfig.from_dict(data)
    config = config.with_overrides({CAPTURE_FLAGS[k]: list(v) if isinstance(v, tuple) else v
                                    for k, v in overrides.items() if k in CAPTURE_FLAGS and v != ()})
    engine = parse_engine_args(overrides.get("engine") or ())
    return config.with_overrides({f"teacher.engine.{k}": v for k, v in engine.items()}) if engine else config


@click.group()
@click.version_option(package_name="logitcache")
def main() -> None:
    """Capture sparse teacher targets once; stream them to student trainers."""


@main.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="YAML capture config; flags override it.")
@click.option("--teacher", help="Local HF model directory, or embedded:smollm2-135m-instruct (default).")
@click.option("--backend", type=click.Choice(BACKENDS), help="Teacher engine: hf (transformers, default) or vllm.")
@click.option("--engine", multiple=True, metavar="KEY=VALUE",
              help="vllm.LLM argument, repeatable (tensor_parallel_size=8, max_model_len=4096, ...); vllm only.")
@click.option("--workers", type=int, help="0 = in this process (default); N = N Ray actors (one engine each).")
@click.option("--encode-threads", type=int,
              help="Threads encoding finished units while the teacher runs (0 = auto: 1 on CPU, up to 4 with a GPU).")
@click.option("--device", help="cpu, cuda, cuda:N or auto (default); with vllm, where the output head runs.")
@click.option("--dtype", type=click.Choice(DTYPES), help="Teacher dtype (default bfloat16).")
@click.option("--trust-remote-code", is_flag=True, default=None, help="Allow a teacher that needs remote code.")
@click.option("--head-chunk", type=int, help="Positions per output-head chunk (default 256; part of the identity).")
@click.option("--corpus", help="A .txt/.md, .jsonl, .parquet file, a directory of one kind, a glob, a HF "
              "save_to_disk dir, builtin:pydoc, builtin:pydoc-chat or builtin:stdlib. Rows with messages, "
              "conversations or prompt/completion are chats.")
@click.option("--text-field", help="Text column/field for JSONL, Parquet and HF datasets (default text).")
@click.option("--split", help="Split of a saved HF DatasetDict (default train).")
@click.option("--seq-len", type=int, help="Positions per window, or at most per document (default 512).")
@click.option("--layout", type=click.Choice(LAYOUTS),
              help="packed: one EOS-joined stream cut into windows; documents: one sequence per document or "
              "conversation, targets only where it trains; auto (default): documents for chats, else packed.")
@click.option("--long-sequences", type=click.Choice(LONG_SEQUENCES),
              help="documents layout: a sequence over seq_len is truncated (default), split into chunks, or skipped.")
@click.option("--train-on", type=click.Choice(TRAIN_ON),
              help="Chat tokens that train: assistant (default), last-assistant, or all.")
@click.option("--chat-template", type=click.Path(dir_okay=False),
              help="Jinja chat template file to render chats with (default: the teacher tokenizer's).")
@click.option("--max-tokens", type=int, help="Stop after about this many tokens (whole windows).")
@click.option("--generate-max-new-tokens", type=int,
              help="Generate the teacher's own responses, at most this many tokens each, to the prompts of a chat "
              "corpus (its conversations up to the last user turn), and capture the targets over them (0 = off).")
@click.option("--generate-temperature", type=float, help="Generation sampling temperature (0 = greedy; default 1).")
@click.option("--generate-top-p", type=float, help="Generation nucleus: keep the top-p probability mass (default 1).")
@click.option("--generate-top-k", type=int, help="Generation: sample among the k most likely tokens (0 = all).")
@click.option("--generate-n", type=int, help="Responses per prompt (default 1).")
@click.option("--generate-stop", multiple=True, metavar="TEXT",
              help="A stop string, repeatable: a response ends once its text holds one (kept in the response).")
@click.option("--method", type=click.Choice(METHODS), help="Sparsifier (default sample).")
@click.option("--k", type=int, help="Head size for topk and hybrid (default 64).")
@click.option("--samples", type=int, help="Draws N for sample and hybrid (default 50).")
@click.option("--temperature", type=float, help="Sampling proposal q ∝ p^(1/τ), sample only (default 1).")
@click.option("--sample-allocation", type=click.Choice(ALLOCATIONS),
              help="Draws per position: fixed (N each, default) or variance (N per position on average over each "
                   "sequence, N_t ∝ the square root of the variance one draw leaves: 1 − Σp², for hybrid its "
                   "tail's; 1 to 4N; τ = 1 only).")
@click.option("--seed", type=int, help="Global seed for the draws (default 0).")
@click.option("--out", help="Store directory or fsspec URL such as s3://bucket/prefix (default ./cache).")
@click.option("--format", type=click.Choice(FORMATS), help="Store container (default arrow).")
@click.option("--sequences-per-shard", type=int, help="Windows per shard = unit of work (default 16).")
@click.option("--logprob-dtype", type=click.Choice(LOGPROB_DTYPES),
              help="Stored logprob precision: float32 (lossless, default); float16 or q8 are lossy (opt-in).")
@click.option("--ids", type=click.Choice(ID_CHOICES), help="Id code (default auto).")
@click.option("--entropy", type=click.Choice(ENTROPY_CODECS),
              help="Entropy stage: zstd (default) or ans, context-modelled rANS per unit (smaller, lossless).")
@click.option("--label-logprobs", is_flag=True, default=None,
              help="Also keep the teacher's exact log-probability of every realized next token, whatever the method "
              "(~4 B/position; for cross-tokenizer students).")
@click.option("--compression-level", type=int, help="zstd level 1-22 (default 9).")
@click.option("--batch-tokens", type=int, help="Tokens per teacher forward batch (speed only; default 4096).")
@click.option("--overwrite", is_flag=True, help="Delete an existing store at --out and start over.")
@click.option("--quiet", is_flag=True, help="No progress bars (ours, the teacher's weight loading, vLLM's).")
def capture(config_path, overwrite, quiet, **flags) -> None:
    """Run the teacher over a corpus and write sparse targets to a store (resumable)."""
    from ..capture import capture as run_capture

    config = load_config(config_path, flags)
    with _progress_bars_off(quiet), _interruptions_reported(config.store.path):
        summary = run_capture(config, overwrite=overwrite, progress=not quiet)
    click.echo(f"captured {summary.tokens} positions in {summary.seconds:.1f}s "
               f"({summary.tokens_per_second:.0f} tok/s); units written {summary.units_written}, "
               f"already committed {summary.units_skipped}; store {summary.store}", err=True)
    _print_summary(summary.store)


@main.command()
@click.argument("src")
@click.argument("dst")
@click.option("--format", type=click.Choice(FORMATS), help="Destination container (default: the source's).")
@click.option("--ids", type=click.Choice(ID_CHOICES), help="Id code (default: the source's).")
@click.option("--logprob-dtype", type=click.Choice(LOGPROB_DTYPES), help="Logprob codec (lossy opt-in).")
@click.option("--compression-level", type=int, help="zstd level (default: the source's).")
@click.option("--entropy", type=click.Choice(ENTROPY_CODECS), help="Entropy stage (default: the source's).")
@click.option("--overwrite", is_flag=True, help="Delete an existing store at DST first.")
def convert(src, dst, format, ids, logprob_dtype, compression_level, entropy, overwrite) -> None:
    """Re-encode store SRC into DST (streaming, resumable), then check both hold the same targets."""
    from ..store.convert import convert as run_convert

    s = run_convert(src, dst, format=format, ids=ids, logprob_dtype=logprob_dtype,
                    compression_level=compression_level, entropy=entropy, overwrite=overwrite)
    click.echo(f"converted {s.units} units ({s.sequences} sequences): {s.source_bytes:,} → {s.destination_bytes:,} "
               f"bytes; verified equal" + (f" within max |Δp| {s.max_prob_error:.3g}" if s.max_prob_error else ""))


@main.command()
@click.argument("store")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def inspect(store, as_json) -> None:
    """Summarise a store: method, teacher, sizes, completeness; check what needs no unit read (object sizes,
    presence, bindings, container metadata); exit 1 if that finds a problem."""
    from ..store import inspect_store

    summary = inspect_store(store)
    if as_json:
        click.echo(json.dumps(summary, sort_keys=True))
    else:
        _print_summary(store, summary)
        click.echo(f"checked          {summary['checked']}: "
                   f"{len(summary['problems']) or 'no'} problem(s)" + ("; records unbound (written before "
                   "bindings)" if summary["unbound_shards"] else ""))
    for problem in summary["problems"]:
        click.echo(f"BAD  {problem}", err=True)
    if summary["problems"]:
        click.echo(f"{len(summary['problems'])} problem(s) in {store}; run `logitcache verify {store}` for the "
                   "full check (checksums, rows)", err=True)
        sys.exit(1)


# tqdm reads TQDM_* when first imported: this process (unless tqdm is loaded already) and every child (Ray, vLLM)
QUIET_ENV = {"TQDM_DISABLE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


@contextmanager
def _progress_bars_off(quiet: bool):
    """With ``--quiet``, no progress bars: ours, transformers' weight loading, the hub's, vLLM's."""
    if not quiet:
        yield
        return
    saved = {key: os.environ.get(key) for key in QUIET_ENV}
    os.environ.update(QUIET_ENV)
    hf_logging = sys.modules.get("transformers.utils.logging")  # loaded already (an in-process caller)
    was_on = hf_logging is not None and hf_logging.is_progress_bar_enabled()
    if was_on:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                del os.environ[key]
            else:
                os.environ[key] = value
        if was_on:
            hf_logging.enable_progress_bar()


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that it stops a capture the way Ctrl-C does."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


@contextmanager
def _interruptions_reported(store: str):
    """Ctrl-C (SIGINT) or SIGTERM: units mid-commit finish, the lock is released, and one line says how many
    units are committed and that the same command resumes; exit 130 (SIGINT) or 143 (SIGTERM)."""
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if main_thread else None
    try:
        yield
    except KeyboardInterrupt as exc:
        name, code = ("SIGTERM", 143) if isinstance(exc, Terminated) else ("SIGINT", 130)
        click.echo(f"\ninterrupted by {name}: {_committed(store)}; rerun the same command to resume.", err=True)
        sys.exit(code)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


def _committed(store: str) -> str:
    from ..store import read_manifest

    try:
        manifest = read_manifest(store)
    except (LogitCacheError, OSError):
        return f"no store was started at {store} yet"
    return f"{len(manifest.shards)} of {manifest.header.plan.shards} units are committed in {store}"


def _print_summary(store: str, summary: dict | None = None) -> None:
    from ..store import inspect_store

    s = summary or inspect_store(store)
    lines = [
        f"store            {s['path']}  (format v{s['format_version']}, {'complete' if s['complete'] else 'INCOMPLETE'})",
        f"method           {s['method']} {json.dumps(s['params'])}  seed {s['seed']}",
        f"teacher          {s['teacher']['name']}  {s['teacher']['dtype']}  weights {s['teacher']['weights_sha256'][:12]}",
        f"tokenizer        {s['tokenizer_fingerprint'][:16]}",
        f"corpus           {s['corpus']['source']}  ({s['corpus']['stats'].get('documents')} documents)",
        *_corpus_input_lines(s["corpus"].get("input")),
        *_sequence_lines(s),
        *generation_lines(s.get("generation"), s["corpus"]["stats"]),
        f"shards           {s['shards']} of {s['planned_shards']}",
        f"encoding         {s['store_format']}  ids {s['encoding']['ids']}  logprobs {s['encoding']['logprobs']}  "
        f"{s['compression']}",
        f"bytes on disk    {s['bytes_on_disk']:,}  ({s['bytes_per_position']:.1f} B/position)",
        f"ids per position {s['mean_ids_per_position']:.2f}",
    ]
    if "sample_totals" in s:
        d = s["sample_totals"]
        lines.append(f"draws/position   min {d['min']}  p10 {d['p10']}  median {d['p50']}  mean {d['mean']:.2f}  "
                     f"p90 {d['p90']}  max {d['max']}")
    if s["encoding"]["logprobs"] != "float32":
        lines.append(f"lossy logprobs   max |Δp| {s['max_prob_error']:.3g}, max |Δ logp| {s['max_logprob_error']:.3g} "
                     "(where p >= 1e-3)")
    click.echo("\n".join(lines))


def _sequence_lines(s: dict) -> list[str]:
    """The sequences line; for a documents store also how the corpus became sequences (its plan's counts)."""
    layout = s["corpus"].get("layout")
    if not layout:
        return [f"sequences        {s['sequences']} × seq_len {s['seq_len']} = {s['positions']} positions"]
    stats = s["corpus"]["stats"]
    lines = [f"sequences        {s['sequences']} documents of at most {s['seq_len']} positions; {s['positions']} "
             f"trained positions (train on {layout['train_on']}) hold targets",
             f"  layout         documents; long sequences {layout['long_sequences']}"
             + (f"; chat template {layout['chat_template_sha256'][:12]}" if "chat_template_sha256" in layout else "")]
    cut = {k: stats[k] for k in ("truncated", "tokens_truncated", "split", "skipped_long", "skipped_untrained",
                                 "conversations_without_assistant", "empty_documents_skipped") if stats.get(k)}
    if cut:
        lines.append("  plan           " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in cut.items()))
    return lines


def _corpus_input_lines(found: dict | None, shown: int = 5) -> list[str]:
    """What the corpus reader recorded (stores before it recorded nothing): files read and skipped, the text."""
    if not found:
        return []
    lines = []
    files, skipped = found["files"], found["skipped"]
    if files:
        lines.append(f"  files read     {len(files)} {found['kind']}: {_first_names(files, shown)}")
    if skipped:
        lines.append(f"  files skipped  {len(skipped)}: {_first_names(skipped, shown)}")
    ends = found["newlines"]
    if ends["crlf"] or ends["cr"]:
        lines.append(f"  line ends      kept as found: {ends['lf']} LF, {ends['crlf']} CRLF, {ends['cr']} CR")
    if found["bom_stripped"]:
        lines.append(f"  byte-order mark dropped at the start of {found['bom_stripped']} file(s)")
    return lines


def _first_names(names: list[str], shown: int) -> str:
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


@main.command()
@click.argument("store")
def verify(store) -> None:
    """Check the manifest and every shard's checksum, size, schema and counts; exit 1 on any problem."""
    from ..store import verify_store

    try:
        report = verify_store(store)
    except LogitCacheError as exc:  # no manifest, or one that cannot be trusted: nothing else can be checked
        click.echo(f"BAD  {exc}", err=True)
        if (Path(store) / "shards").is_dir():
            click.echo(f"{store} holds shards but no usable manifest; recapture it (`logitcache capture ... "
                       "--overwrite`)", err=True)
        sys.exit(1)
    for problem in report.problems:
        click.echo(f"BAD  {problem}", err=True)
    if not report.ok:
        click.echo(f"{len(report.problems)} problem(s) in {store}", err=True)
        sys.exit(1)
    click.echo(f"ok: {report.shards} shards verified in {store}")


from .generations import export_generations_command, generation_lines  # noqa: E402
from .train import train_command  # noqa: E402

main.add_command(train_command)
main.add_command(export_generations_command)


def run() -> None:
    """Entry point that turns our errors into one clean line and exit code 2."""
    try:
        main(standalone_mode=False)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except LogitCacheError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except OSError as exc:  # e.g. a store or config that cannot be read: one line, no traceback
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    run()
