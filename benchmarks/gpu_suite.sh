#!/usr/bin/env bash
# One command for a GPU machine (issue #17, "The GPU"): the CUDA tests, every GPU benchmark, then the issue's
# ratios, with each step's log and every CSV row under $OUT.
#
#   bash benchmarks/gpu_suite.sh prepare     # here, once, before the run: fills .gpu-like/ and .whl/
#   bash benchmarks/gpu_suite.sh             # on the GPU machine, from the repository root
#   SMOKE=1 bash benchmarks/gpu_suite.sh     # tiny sizes on a CPU (--device cpu; CUDA tests skip): checks the script
#
# The device tool's call (docs/benchmarks.md, "The GPU suite"): command
#   PYTHONUNBUFFERED=1 bash benchmarks/gpu_suite.sh
# carry [".gpu-like", ".whl"], timeout_s 600. carry must name:
#   .gpu-like  SmolLM2-135M-Instruct's config.json, generation_config.json and tokenizer files (~3.5 MB, no
#              weights: random_teacher.py builds the model there) and COMMIT (the commit the run measures, since
#              the CSVs' commit column reads "unknown" where no git repository travels);
#   .whl       liger_kernel-0.8.5-py3-none-any.whl (910,117 bytes, pure Python; needs only torch and triton,
#              both on the machine): `pip download liger-kernel==0.8.5 --no-deps -d .whl`, which `prepare` runs.
#              Without it the head_liger_bf16 case is skipped and head_fused is compared with head_plain.
# Both folders are git-ignored; neither is committed.
#
# Files back: at most 8 come back from $OUT; this writes 7: setup.log, tests.log, bench.log, summary.txt and
# capture_speed_gpu.csv, sparsify_speed_gpu.csv, loss_speed_gpu.csv (the names the benchmarks' --csv options take;
# rows carry their provenance: time, machine and GPU, torch version).
#
# Time on one H100/H200, estimated from the H100 figures in docs/benchmarks.md (steps 2-3 about 6.5-8.5 min):
#   setup                 ~15 s   wheels, nvidia-smi, versions
#   tests                ~1.5-2.5 min  ~170 CUDA cases (their CPU twins take 32 s on the 2-core VM) plus Triton
#                                 compiles and the tiny-teacher reference captures; capped at TESTS_S (240 s)
#   capture               ~1 min  random teacher (~15 s), 3 methods x 3 interleaved repeats of 110,592 positions
#                                 (the H100 ran one such invocation in 25-35 s at 0.14-0.36 of the bare forward)
#   sparsify             ~30 s    [16384, 49152] synthetic logits built on the CPU, kernels ~1 s, encode parts ~10 s
#   loss                ~3.5-4.5 min  24 cases, each a fresh process (python + torch + CUDA start ~5-8 s) plus
#                                 the compiled cases' Triton compiles (inductor's cache is shared across them)
# DEADLINE (540 s) bounds every step from the suite's start, so the summary runs inside one 600 s command even
# when a step overruns; STEPS="capture loss" reruns a subset (setup's environment always comes first).
#
# Environment: OUT (default ./bench-out/gpu), SMOKE=1, STEPS (default "tests capture sparsify loss"),
# DEADLINE, TESTS_S, PYTHON (default .venv/bin/python where it exists, else python3), SITE (where the wheels go,
# default /tmp/site), TEACHER_DIR (the random teacher, default /tmp/lc-gpu-suite-teacher).
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
LIKE=$ROOT/.gpu-like
LIGER=liger-kernel==0.8.5
if [[ -z ${PYTHON:-} ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=$ROOT/.venv/bin/python; else PYTHON=python3; fi
fi

die() { echo "gpu_suite.sh: $*" >&2; exit 2; }

prepare() {
    local src copied
    src=${LIKE_FROM:-$(PYTHONPATH=$ROOT "$PYTHON" -c 'from logitcache.models.embedded import resolve_teacher_path as r
print(r("embedded:smollm2-135m-instruct"))')}
    copied=$(cd benchmarks && "$PYTHON" -c 'from random_teacher import COPIED; print(*COPIED)')
    mkdir -p "$LIKE"
    for name in $copied; do
        if [[ -f $src/$name ]]; then cp "$src/$name" "$LIKE/"; fi
    done
    [[ -f $LIKE/config.json ]] || die "no config.json in $src (set LIKE_FROM to SmolLM2-135M's directory)"
    git describe --always --dirty --abbrev=7 > "$LIKE/COMMIT"
    if ! compgen -G ".whl/liger_kernel-*.whl" > /dev/null; then
        "$PYTHON" -m pip download "$LIGER" --no-deps -d .whl \
            || echo "gpu_suite.sh: could not download $LIGER; head_liger_bf16 will be skipped" >&2
    fi
    du -sh "$LIKE" .whl 2>/dev/null || true
    echo "prepared $LIKE ($(cat "$LIKE/COMMIT")): carry [\".gpu-like\", \".whl\"]"
}

if [[ ${1:-} == prepare ]]; then prepare; exit 0; fi
[[ $# -eq 0 ]] || die "unknown argument '$1' (expected nothing or 'prepare')"
[[ -f $LIKE/config.json ]] || die "$LIKE/config.json is missing: run 'bash benchmarks/gpu_suite.sh prepare' here first, and carry .gpu-like"

OUT=${OUT:-$ROOT/bench-out/gpu}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
SMOKE=${SMOKE:-0}
STEPS=${STEPS:-tests capture sparsify loss}
DEADLINE=${DEADLINE:-540}
TESTS_S=${TESTS_S:-240}
SITE=${SITE:-/tmp/site}
TEACHER_DIR=${TEACHER_DIR:-/tmp/lc-gpu-suite-teacher}
export PYTHONUNBUFFERED=1
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}

# ------------------------------------------------------------------ sizes
LOSS_CASES=ce,rskd_compiled,rskd+ce,rskd+ce_compiled,ce_bf16,rskd_bf16_compiled,rskd+ce_bf16,rskd+ce_bf16_compiled
HEAD_CASES=head_plain_bf16,head_chunked_bf16,head_fused_bf16,head_liger_bf16
if [[ $SMOKE == 1 ]]; then
    TEACHER_SET=(--set num_hidden_layers=2)  # SmolLM2's width and vocabulary, 2 of its 30 layers
    CAPTURE=(--tokens 1024 --seq-len 256 --batch-tokens 1028 --head-chunk 256 --repeats 1)
    SPARSIFY=(--positions 1024 --chunk 256 --repeats 1)
    LOSS_VOCABS=(1024 512)
    LOSS=(--seq 128 --repeats 1)
    HEAD=(--seq 128 --hidden 64 --chunk 32 --repeats 1)
else
    TEACHER_SET=()
    CAPTURE=(--tokens 110000 --seq-len 2048 --batch-tokens 32784 --head-chunk 2048 --repeats 3)
    SPARSIFY=(--positions 16384 --chunk 2048 --repeats 5)
    LOSS_VOCABS=(152064 49152)  # the issue's headline size first
    LOSS=(--seq 2048 --repeats 5)
    HEAD=(--seq 8192 --hidden 4096 --chunk 2048 --repeats 5)
fi

# ------------------------------------------------------------------ running steps
STATUS=()   # one "step: ok|failed (rc) (seconds)" line each, for summary.txt

left() { echo $((DEADLINE - SECONDS)); }

bounded() {  # bounded SECONDS CMD...: CMD under the smaller of SECONDS and what is left before DEADLINE
    local limit=$1
    shift
    if ((limit > $(left))); then limit=$(left); fi
    if ((limit < 5)); then
        echo "skipped (the suite's deadline, $DEADLINE s, is reached): $*"
        return 124
    fi
    timeout --kill-after=10 "$limit" "$@" || {
        local rc=$?
        if ((rc == 124)); then echo "stopped after $limit s (its time limit or the suite's deadline): $*"; fi
        return $rc
    }
}

record() {  # record NAME RC START LOG: one line of STATUS
    if (($2 == 0)); then
        STATUS+=("$1: ok ($((SECONDS - $3)) s)")
    else
        STATUS+=("$1: FAILED, exit $2 ($((SECONDS - $3)) s; see $(basename "$4"))")
    fi
}

run_step() {  # run_step NAME LOG FUNCTION: FUNCTION's output to the terminal and LOG, its status to STATUS
    local start=$SECONDS rc
    echo "== $1 ($(date -u +%FT%TZ), $SECONDS s into the suite)" | tee -a "$2"
    set +e
    (set -e; "$3") 2>&1 | tee -a "$2"
    rc=${PIPESTATUS[0]}
    set -e
    record "$1" "$rc" "$start" "$2"
}

# ------------------------------------------------------------------ 1. setup (in this shell: PYTHONPATH carries on)
setup() {
    local wheels=(.whl/*.whl)
    if [[ -e ${wheels[0]} ]]; then
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
            "${wheels[@]}" || return
        export PYTHONPATH=$PYTHONPATH:$SITE
        echo "installed into $SITE: ${wheels[*]}"
    fi
    echo "commit measured: $(cat "$LIKE/COMMIT" 2>/dev/null || echo unknown); SMOKE=$SMOKE; PYTHONPATH=$PYTHONPATH"
    nvidia-smi || echo "(no nvidia-smi here)"
    "$PYTHON" - <<'EOF'
import importlib, importlib.metadata, sys, torch
print(f"python {sys.version.split()[0]}; torch {torch.__version__} (CUDA {torch.version.cuda}); "
      f"cuda available: {torch.cuda.is_available()}"
      + (f", {torch.cuda.get_device_name()}, {torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB"
         if torch.cuda.is_available() else ""))
for name in ("triton", "liger_kernel", "numba", "pyarrow", "transformers", "zarr", "datasets", "ray", "vllm"):
    try:
        importlib.import_module(name)
        print(f"  {name} {importlib.metadata.version(name.replace('_', '-'))}")
    except Exception as exc:  # what is missing here is skipped or left out below
        print(f"  {name}: not importable ({type(exc).__name__}: {exc})")
EOF
}

device() {
    "$PYTHON" -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")'
}

# ------------------------------------------------------------------ 2. the CUDA tests
# The device-parametrised tests (helpers.DEVICES, whose ids hold "cuda" where a GPU is present) and those
# marked gpu, in every unit-test module that names CUDA. A module that cannot be collected for want of a
# package this machine lacks is left out by name (the tests are not edited); any other collection error fails.
OPTIONAL='zarr|numcodecs|datasets|ray|vllm|gguf|moto|boto3|s3fs|torchdata'
lacking() {  # lacking MODULES...: those whose collection stops at a missing optional package (pytest's report)
    local report
    report=$(bounded 120 "$PYTHON" -m pytest -p no:cacheprovider --collect-only -q --continue-on-collection-errors \
        -k "cuda or gpu" "$@" 2>&1) || true  # collection errors are what this looks for
    awk -v opt="$OPTIONAL" '
        / ERROR collecting / { for (i = 1; i < NF; i++) if ($i == "collecting") file = $(i + 1) }
        $0 ~ ("^E +ModuleNotFoundError: No module named \047(" opt ")[.\047]") { print file }' <<< "$report" | sort -u
}

cuda_tests() {
    local modules skip
    modules=$(grep -lE 'cuda|mark\.gpu|\bDEVICES\b' tests/unit/test_*.py)
    skip=$(lacking $modules)
    echo "modules:" $modules
    echo "left out (a package missing here): ${skip:-none}"
    bounded "$TESTS_S" "$PYTHON" -m pytest -p no:cacheprovider -q -x --timeout 300 -k "cuda or gpu" \
        $(for m in $skip; do echo "--ignore=$m"; done) $modules
}

# ------------------------------------------------------------------ 3. the benchmarks
capture_bench() {
    bounded 120 "$PYTHON" benchmarks/random_teacher.py --like "$LIKE" --out "$TEACHER_DIR" --norm-scale 11 \
        "${TEACHER_SET[@]}"
    bounded 300 "$PYTHON" benchmarks/capture_speed.py --teacher "$TEACHER_DIR" --device "$DEVICE" \
        --encode-threads 4 "${CAPTURE[@]}" --csv "$OUT/capture_speed_gpu.csv"
}

sparsify_bench() {
    bounded 180 "$PYTHON" benchmarks/sparsify_speed.py --device "$DEVICE" --encode "${SPARSIFY[@]}" \
        --csv "$OUT/sparsify_speed_gpu.csv"
}

loss_bench() {  # one invocation per vocabulary and kind: what finished is in the CSV if a later one fails
    local v rc=0
    for v in "${LOSS_VOCABS[@]}"; do
        loss_speed --vocab "$v" --cases "$LOSS_CASES" "${LOSS[@]}" || rc=$?
        # a case that crashes loses its invocation's rows: where Liger's is the one, the others run again without it
        loss_speed --vocab "$v" --cases "$HEAD_CASES" "${HEAD[@]}" || {
            rc=$?
            ((rc == 124)) || loss_speed --vocab "$v" --cases "${HEAD_CASES%,head_liger_bf16}" "${HEAD[@]}" || true
        }
    done
    return $rc
}

loss_speed() {
    bounded 300 "$PYTHON" benchmarks/loss_speed.py --device "$DEVICE" --csv "$OUT/loss_speed_gpu.csv" "$@"
}

# ------------------------------------------------------------------ the run
for step in $STEPS; do
    [[ $step =~ ^(tests|capture|sparsify|loss)$ ]] || die "unknown step '$step' in STEPS (expected tests, capture, sparsify, loss)"
done
rm -f "$OUT"/{setup,tests,bench}.log "$OUT/summary.txt"  # this run's logs only; CSV rows append
echo "== setup ($(date -u +%FT%TZ))" > "$OUT/setup.log"
set +e
setup >> "$OUT/setup.log" 2>&1  # in this shell, so that PYTHONPATH carries on to the steps
rc=$?
set -e
cat "$OUT/setup.log"
record setup "$rc" 0 "$OUT/setup.log"
DEVICE=$(device)
if [[ $DEVICE != cuda && $SMOKE != 1 ]]; then
    die "no CUDA device here (torch.cuda.is_available() is False): run with SMOKE=1 for the CPU check"
fi
for step in $STEPS; do
    case $step in
        tests) run_step tests "$OUT/tests.log" cuda_tests ;;
        capture) run_step capture "$OUT/bench.log" capture_bench ;;
        sparsify) run_step sparsify "$OUT/bench.log" sparsify_bench ;;
        loss) run_step loss "$OUT/bench.log" loss_bench ;;
    esac
done

# ------------------------------------------------------------------ 4. the summary
{
    echo "# GPU suite, commit $(cat "$LIKE/COMMIT" 2>/dev/null || echo unknown), SMOKE=$SMOKE, ${SECONDS} s"
    printf '%s\n' "${STATUS[@]}"
    if [[ -f $OUT/tests.log ]]; then
        echo "tests: $(grep -E '^(=+ )?[0-9]+ (passed|failed|skipped|deselected|errors?)|no tests ran' "$OUT/tests.log" | tail -1)"
    fi
    echo
    "$PYTHON" benchmarks/gpu_summary.py "$OUT"
} 2>&1 | tee "$OUT/summary.txt"
if printf '%s\n' "${STATUS[@]}" | grep -q FAILED; then exit 1; fi
