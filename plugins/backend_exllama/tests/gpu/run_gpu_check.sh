#!/usr/bin/env bash
# The exllama backend on a bare, offline CUDA machine, in one command and under eight minutes:
#
#   bash plugins/backend_exllama/tests/gpu/run_gpu_check.sh        (from a copy of the working tree plus .whl/)
#
# Phases, each under its own `timeout` and all under one overall deadline, so that a slow phase shortens the
# ones after it instead of pushing the run past its limit; a failed phase never stops the next one:
#   install  the wheels of .whl/ and gallama + the plugins it needs, into a --target folder (nothing else is
#            reachable: no index, no network)
#   env      GPU, driver, torch, CUDA, compiler and package versions
#   compile  `import exllamav2`: its CUDA extension is built on first import (torch's JIT, ninja); timed, its
#            build output streamed to compile.log
#   pytest   plugins/backend_exllama/tests/test_gpu.py
#   e2e      `gallama run` serving the tiny random-weight Llama with backend=exllama, checked over HTTP with the
#            openai client (e2e.py)
#   bench    decode speed, concurrency, grammar cost and prefix reuse against the same server (bench.py)
#   profile  in process, under cProfile: a prompt with its prefix cached vs the same length cold
#            (profile_prefix.py)
#
# A run returns the extension it built (exllamav2_ext.so.gz); carried back as .ext/exllamav2_ext.so.gz, the
# next run imports it instead of building it (about 140 s saved on an H200).
#
# $OUT/report.md grows as the phases end (a run killed at its limit keeps what finished); logs are $OUT/*.log.
# Progress lines go to stdout. Every setting below can be overridden from the environment, which is also how
# the same script runs against the llama.cpp backend on a machine without a GPU (see README.md).
set -u -o pipefail

GPU_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$GPU_DIR/../../../.." && pwd)
export GPU_DIR REPO
export OUT=${OUT:-/tmp/gpu-out}
export PY=${PYTHON:-python3}
if [[ $PY == */* && $PY != /* ]]; then  # phases run in $WORK: a relative path would no longer resolve
    PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")
fi
export WORK=${GPU_CHECK_WORK:-/tmp/gpu-check}
export WHEELS=${GPU_CHECK_WHEELS:-$REPO/.whl}
# the --target folder of the install phase; empty: use $PY's own packages as they are (no install phase)
export SITE=${GPU_CHECK_SITE-$WORK/site}
export PHASES=${GPU_CHECK_PHASES:-install env compile pytest e2e bench profile}
export TOTAL_S=${GPU_CHECK_TOTAL_S:-470}
export BACKEND=${GPU_CHECK_BACKEND:-exllama}
export MODEL_NAME=${GPU_CHECK_MODEL_NAME:-tiny-$BACKEND}
export MODEL_ID=${GPU_CHECK_MODEL_ID:-$WORK/tiny-llama}
export MODEL_KEYS=${GPU_CHECK_MODEL_KEYS-max_seq_len=8192 cache_size=16384 max_concurrent_requests=8}
export REPORT=$OUT/report.md
export REQUIRE_GPU=${GPU_CHECK_REQUIRE_GPU:-1}  # 0: GPU tests that skip are not a failure (a CPU dry run)
export PYTHONUNBUFFERED=1 PIP_CONFIG_FILE=/dev/null PIP_DISABLE_PIP_VERSION_CHECK=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 GALLAMA_HOME_PATH=$WORK/home
# exllamav2's extension: build for the H200's sm_90 only (one device pass per source, not one per known
# architecture), on every core, into a folder every later phase finds again (same folder, same flags: no rebuild)
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
MAX_JOBS=${MAX_JOBS:-$(nproc)}
export MAX_JOBS
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$WORK/torch_extensions}
if [ -n "$SITE" ] && [[ :${PYTHONPATH:-}: != *:$SITE:* ]]; then
    export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
    export PATH=$SITE/bin:$PATH
fi

# a prebuilt extension from an earlier run on the same kind of machine (see phase_compile)
if [ -f "$REPO/.ext/exllamav2_ext.so.gz" ]; then
    mkdir -p "$WORK/prebuilt"
    gunzip -c "$REPO/.ext/exllamav2_ext.so.gz" >"$WORK/prebuilt/exllamav2_ext.so"
    export PYTHONPATH=$WORK/prebuilt${PYTHONPATH:+:$PYTHONPATH}
fi

START=${GPU_CHECK_START:-$(date +%s)}
export START GPU_CHECK_START=$START  # the phases (children of this script) stamp from the same start
DEADLINE=$((START + TOTAL_S))

stamp() { printf '%(%H:%M:%S)T +%ss' -1 "$(($(date +%s) - START))"; }
say() { echo "[$(stamp)] $*"; }
note() { echo "$*" >>"$REPORT"; }

# ---------------------------------------------------------------------------------------------------- phases
# Each runs in a child of this script (`run_gpu_check.sh __phase NAME`) so that `timeout` can end it with all
# it started; progress lines the Python scripts write to file descriptor 3 reach stdout, the rest goes to the log.

phase_install() {
    local src=$WORK/src
    if [ -z "$SITE" ]; then
        echo "- GPU_CHECK_SITE is empty: nothing installed, $PY's own packages are used" | tee -a "$REPORT" >&3
        return 0
    fi
    rm -rf "$SITE" "$src" && mkdir -p "$SITE" "$src" || return 1
    # a copy of the sources: setuptools writes build/ and *.egg-info beside what it builds
    tar -C "$REPO" --exclude=__pycache__ --exclude='*.egg-info' --exclude=build -cf - pyproject.toml README.md \
        gallama_kernel plugins/backend_exllama plugins/feature_artifact plugins/feature_thinking |
        tar -C "$src" -xf - || return 1
    local wheels=("$WHEELS"/*.whl) build_path=''
    echo "wheels: ${#wheels[@]} in $WHEELS ($(du -sh "$WHEELS" | cut -f1))" | tee -a "$REPORT" >&3
    # gallama and its plugins are built here (no isolation: no index to fetch a build backend from) with the
    # interpreter's setuptools, or, when it has none or one older than pyproject.toml's setuptools>=68, with the
    # one carried in $WHEELS/build/ (kept out of $SITE: torch imports setuptools too)
    if ! "$PY" -c 'import setuptools, sys; sys.exit(int(setuptools.__version__.split(".")[0]) < 68)' 2>/dev/null; then
        build_path=$WORK/buildtools
        rm -rf "$build_path"
        "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$build_path" "$WHEELS"/build/*.whl ||
            return 1
        echo "- building with the carried setuptools: the interpreter has none >= 68" | tee -a "$REPORT" >&3
    fi
    PYTHONPATH=$build_path "$PY" -m pip install --no-index --no-deps --no-compile --no-cache-dir \
        --no-build-isolation --upgrade --target "$SITE" "${wheels[@]}" "$src" "$src/plugins/backend_exllama" \
        "$src/plugins/feature_artifact" "$src/plugins/feature_thinking" || return 1
    "$PY" - <<'EOF' || return 1
import importlib, importlib.metadata as md, os, sys
site = os.environ["SITE"]
names = ["gallama_kernel", "gallama_backend_exllama", "gallama_feature_artifact", "gallama_feature_thinking",
         "fastapi", "starlette", "uvicorn", "pydantic", "pydantic_settings", "lark", "llguidance", "openai"]
bad = []
for name in names:
    try:
        module = importlib.import_module(name)
        where = getattr(module, "__file__", "") or ""
        print(f"import {name}: ok ({where})")
        if not where.startswith(site):
            print(f"  note: {name} does not come from {site}")
    except Exception as error:
        bad.append(f"{name} ({type(error).__name__}: {error})")
points = sorted(f"{ep.name}={ep.value}" for ep in md.entry_points(group="gallama"))
print("entry points gallama:", ", ".join(points))
with open(os.environ["REPORT"], "a") as report:
    report.write(f"- imports: {'all ok' if not bad else 'FAILED: ' + '; '.join(bad)}\n")
    report.write(f"- entry points `gallama`: {', '.join(points) or 'none'}\n")
sys.exit(1 if bad else 0)
EOF
    "$PY" -c 'from gallama_kernel.cli import main; main()' plugins --json >"$WORK/plugins.json" || return 1
    cat "$WORK/plugins.json"
    "$PY" - "$WORK/plugins.json" <<'EOF'
import json, os, sys
records = json.load(open(sys.argv[1]))
shown = ", ".join(f"{r['name']} {r['version']} {r['status']}" for r in records)
with open(os.environ["REPORT"], "a") as report:
    report.write(f"- `gallama plugins`: {shown}\n")
wanted = {"exllama", "artifact", "thinking"}
loaded = {r["name"] for r in records if r["status"] == "loaded"}
sys.exit(0 if wanted <= loaded else 1)
EOF
}

phase_env() {
    nvidia-smi || echo "nvidia-smi: not available"
    nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv,noheader 2>/dev/null |
        sed 's/^/- GPU: /' | tee -a "$REPORT" >&3
    { nvcc --version 2>/dev/null | tail -n 2 | tr '\n' ' '; echo; } | sed 's/^/- nvcc: /' | tee -a "$REPORT" >&3
    echo "- gcc: $(gcc --version 2>/dev/null | head -n 1); ninja: $(ninja --version 2>/dev/null); cores: $(nproc);" \
        "memory: $(free -g 2>/dev/null | awk '/Mem:/ {print $2 " GiB"}'); /tmp free: $(df -h /tmp | awk 'NR==2 {print $4}')" |
        tee -a "$REPORT" >&3
    "$PY" - <<'EOF'
import importlib.metadata as md, os, platform
lines = [f"- python {platform.python_version()} ({os.path.realpath(__import__('sys').executable)})"]
try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    with open(os.path.join(os.environ["WORK"], "cuda_home"), "w") as file:  # for check_build_headers
        file.write(CUDA_HOME or "")
    cuda = torch.cuda.is_available()
    device = f"{torch.cuda.get_device_name(0)}, capability {torch.cuda.get_device_capability(0)}" if cuda else "none"
    lines.append(f"- torch {torch.__version__}, CUDA {torch.version.cuda}, cuda available: {cuda}, device: {device}")
except Exception as error:
    lines.append(f"- torch: not importable ({type(error).__name__}: {error})")
names = ["exllamav2", "flash-attn", "xformers", "llguidance", "gallama", "gallama-backend-exllama", "fastapi",
         "uvicorn", "pydantic", "openai", "numpy", "safetensors", "tokenizers", "transformers", "ninja", "setuptools"]
found = []
for name in names:
    try:
        found.append(f"{name} {md.version(name)}")
    except md.PackageNotFoundError:
        found.append(f"{name} (absent)")
lines.append("- packages: " + ", ".join(found))
print("\n".join(lines))
with open(os.environ["REPORT"], "a") as report:
    report.write("\n".join(lines) + "\n")
EOF
    echo "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS TORCH_EXTENSIONS_DIR=$TORCH_EXTENSIONS_DIR" |
        sed 's/^/- build settings: /' | tee -a "$REPORT" >&3
    check_build_headers
}

# The headers exllamav2's build includes besides the CUDA runtime's: cuBLAS, cuSPARSE, cuSOLVER (through torch's
# ATen/cuda headers), cuRAND (exllamav2's quantize.cu) and Python.h. torch compiles against $CUDA_HOME/include
# only; where the toolkit lacks one, the nvidia-* wheels beside torch carry it: their include folder goes on
# CPATH (read by gcc, which preprocesses for nvcc too) through $WORK/cuda.env, which the driver loads after this
# phase.
check_build_headers() {
    local home nvidia found header extra=()
    # the folder torch will compile against (its own rule: CUDA_HOME, CUDA_PATH, nvcc on PATH, /usr/local/cuda),
    # as phase_env's Python found it
    home=$(cat "$WORK/cuda_home" 2>/dev/null)
    if [ -z "$home" ]; then
        home=${CUDA_HOME:-${CUDA_PATH:-}}
        if [ -z "$home" ] && command -v nvcc >/dev/null; then
            home=$(dirname "$(dirname "$(command -v nvcc)")")
        fi
    fi
    nvidia=$("$PY" -c 'import nvidia; print(" ".join(nvidia.__path__))' 2>/dev/null)
    for header in cuda_runtime.h cublas_v2.h cusparse.h cusolverDn.h curand_kernel.h; do
        if [ -n "$home" ] && [ -f "$home/include/$header" ]; then
            continue
        fi
        # shellcheck disable=SC2086  # several folders
        found=$(find $nvidia -path "*/include/$header" 2>/dev/null | head -n 1)
        if [ -n "$found" ]; then
            extra+=("$(dirname "$found")")
            echo "- $header: not in $home/include, taken from $(dirname "$found")" | tee -a "$REPORT" >&3
        else
            echo "- $header: MISSING (not in $home/include nor in the nvidia-* packages): the build will fail" |
                tee -a "$REPORT" >&3
        fi
    done
    # Python.h: torch compiles against the interpreter's include folder; an interpreter installed without its
    # development headers gets the CPython 3.12 headers carried beside the wheels (same minor version: same ABI)
    local include
    include=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
    if [ ! -f "$include/Python.h" ]; then
        if [ -f "$WHEELS/cpython-3.12-include.tar.gz" ] && "$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))'
        then
            mkdir -p "$WORK/python-include" && tar -C "$WORK/python-include" -xzf "$WHEELS/cpython-3.12-include.tar.gz"
            extra+=("$WORK/python-include/python3.12")
            echo "- Python.h: not in $include, taken from the carried CPython 3.12 headers" | tee -a "$REPORT" >&3
        else
            echo "- Python.h: MISSING in $include: the build will fail" | tee -a "$REPORT" >&3
        fi
    fi
    if ((${#extra[@]})); then
        local joined
        joined=$(printf '%s\n' "${extra[@]}" | sort -u | paste -sd:)
        echo "export CPATH=$joined\${CPATH:+:\$CPATH}" >"$WORK/cuda.env"
    fi
    echo "- CUDA_HOME for the build: ${home:-none found}" | tee -a "$REPORT" >&3
}

phase_compile() {
    "$PY" "$GPU_DIR/compile_ext.py" || return 1
    # the built extension comes back (gzipped, when small enough) so that a second run can skip the build:
    # carry it as .ext/exllamav2_ext.so.gz and exllamav2 imports it as a prebuilt module
    local built
    built=$(find "$TORCH_EXTENSIONS_DIR" -name 'exllamav2_ext*.so' 2>/dev/null | head -n 1)
    if [ -n "$built" ] && [ ! -f "$WORK/prebuilt/exllamav2_ext.so" ]; then
        gzip -c "$built" >"$WORK/exllamav2_ext.so.gz"
        if [ "$(stat -c %s "$WORK/exllamav2_ext.so.gz")" -lt 16000000 ]; then
            mv "$WORK/exllamav2_ext.so.gz" "$OUT/exllamav2_ext.so.gz"
            echo "- built extension returned as exllamav2_ext.so.gz ($(stat -c %s "$OUT/exllamav2_ext.so.gz") bytes)" |
                tee -a "$REPORT" >&3
        fi
    fi
}

phase_pytest() {
    local summary=$WORK/pytest-summary.txt
    # from $WORK with the tree's config: the test imports the installed gallama, not the tree's
    "$PY" -m pytest -p no:cacheprovider -o faulthandler_timeout=60 -v -rA --rootdir "$REPO" \
        -c "$REPO/pyproject.toml" "$REPO/plugins/backend_exllama/tests/test_gpu.py" 2>&1 | tee "$summary"
    local rc=${PIPESTATUS[0]}
    grep -E '^(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS) |^=+ .*(passed|failed|skipped|error).* =+$' "$summary" |
        sed 's/^/- /' | tee -a "$REPORT" >&3
    if [ "$rc" = 0 ] && [ "$REQUIRE_GPU" = 1 ] && ! grep -q '^PASSED ' "$summary"; then
        echo "- nothing passed: the GPU tests skipped (no CUDA or no exllamav2), which on a GPU machine is a failure" |
            tee -a "$REPORT" >&3
        return 1
    fi
    return "$rc"
}

phase_e2e() {
    if [ "$MODEL_ID" = "$WORK/tiny-llama" ]; then
        "$PY" "$GPU_DIR/make_model.py" "$MODEL_ID" || return 1
    fi
    "$PY" "$GPU_DIR/server.py" start --name "$MODEL_NAME" --model-id "$MODEL_ID" --backend "$BACKEND" \
        --keys "$MODEL_KEYS" --state "$WORK/server.json" --log "$OUT/server.log" --wait 90 || return 1
    "$PY" "$GPU_DIR/e2e.py" --state "$WORK/server.json"
}

phase_bench() {
    if [ ! -s "$WORK/server.json" ] || ! "$PY" "$GPU_DIR/server.py" alive --state "$WORK/server.json"; then
        note "- the e2e phase's server is not running: starting one"
        "$PY" "$GPU_DIR/server.py" start --name "$MODEL_NAME" --model-id "$MODEL_ID" --backend "$BACKEND" \
            --keys "$MODEL_KEYS" --state "$WORK/server.json" --log "$OUT/server.log" --wait 60 || return 1
    fi
    "$PY" "$GPU_DIR/bench.py" --state "$WORK/server.json" --budget-s "$1"
}

phase_profile() {
    "$PY" "$GPU_DIR/profile_prefix.py"
}

if [ "${1:-}" = "__phase" ]; then
    # fd 3: the progress channel to the parent's stdout (see run_phase). Phases run in $WORK, not in the tree:
    # Python puts the working directory first on sys.path, and the installed copy is what is under test
    cd "$WORK" || exit 1
    "phase_$2" "${@:3}"
    exit $?
fi

# ---------------------------------------------------------------------------------------------------- driver
declare -A BUDGET=([install]=30 [env]=30 [compile]=270 [pytest]=75 [e2e]=110 [bench]=55 [profile]=45)
for phase in "${!BUDGET[@]}"; do  # GPU_CHECK_BUDGET_E2E=300 …: longer phases for a slow CPU dry run
    override=GPU_CHECK_BUDGET_${phase^^}
    BUDGET[$phase]=${!override:-${BUDGET[$phase]}}
done
declare -A LOGFILE=([install]=setup [env]=setup [compile]=compile [pytest]=pytest [e2e]=e2e [bench]=bench
                   [profile]=profile)
declare -a RESULTS=()

run_phase() {
    local name=$1 budget=${BUDGET[$1]} log=$OUT/${LOGFILE[$1]}.log
    local left=$((DEADLINE - $(date +%s)))
    local limit=$((budget < left ? budget : left))
    note ""
    note "## $name (budget ${budget} s, started $(stamp))"
    if ((limit < 5)); then
        note "**SKIPPED**: the overall limit of ${TOTAL_S} s is reached"
        say "$name: skipped (no time left)"
        RESULTS+=("| $name | skipped | 0 | $budget |")
        return
    fi
    say "$name: start (limit ${limit} s; log ${LOGFILE[$1]}.log)"
    echo "===== $name $(date -u +%FT%TZ) limit ${limit}s" >>"$log"
    local t0 rc status
    t0=$(date +%s)
    # torch's JIT build holds this lock while it builds; a build ended by a timeout leaves it behind, and every
    # later import would wait on it forever (the next import resumes the build from the objects already made)
    rm -f "$TORCH_EXTENSIONS_DIR/exllamav2_ext/lock"
    # -k: a phase that ignores SIGTERM is killed 5 s later; fd 3 carries progress lines to our stdout
    timeout -k 5 "$limit" bash "$GPU_DIR/run_gpu_check.sh" __phase "$name" "$limit" 3>&1 >>"$log" 2>&1
    rc=$?
    local took=$(($(date +%s) - t0))
    case $rc in
        0) status=PASS ;;
        124 | 137) status="TIMEOUT after ${limit} s" ;;
        *) status="FAIL (exit $rc)" ;;
    esac
    if [ "$rc" != 0 ]; then
        note ""
        note "<details><summary>last lines of ${LOGFILE[$1]}.log</summary>"
        note ""
        note '```'
        tail -n 40 "$log" | cut -c1-400 >>"$REPORT"
        note '```'
        note "</details>"
    fi
    note ""
    note "**$status** in ${took} s"
    say "$name: $status in ${took} s"
    RESULTS+=("| $name | $status | $took | $budget |")
}

finish() {
    if [ -s "$WORK/server.json" ]; then
        "$PY" "$GPU_DIR/server.py" stop --state "$WORK/server.json" >>"$OUT/server.log" 2>&1
    fi
    note ""
    note "## Summary ($(stamp) in all)"
    note ""
    note "| phase | result | seconds | budget |"
    note "| --- | --- | --- | --- |"
    for row in "${RESULTS[@]}"; do note "$row"; done
    # every log under 16 MiB: keep the end, where failures are
    for log in "$OUT"/*.log; do
        if [ -f "$log" ] && [ "$(stat -c %s "$log")" -gt 15000000 ]; then
            tail -c 14000000 "$log" >"$log.tmp" && mv "$log.tmp" "$log"
        fi
    done
    say "done: $REPORT"
}

mkdir -p "$OUT" "$WORK"
rm -f "$WORK/server.json" "$WORK/cuda.env" "$WORK/cuda_home"
{
    echo "# GPU check of the exllama backend"
    echo ""
    echo "- started $(date -u +%FT%TZ) on $(hostname), overall limit ${TOTAL_S} s, phases: $PHASES"
    echo "- backend \`$BACKEND\`, model \`$MODEL_NAME\` = $MODEL_ID ($MODEL_KEYS)"
    echo "- tree: $REPO ($(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo 'no git'))"
} >"$REPORT"
trap finish EXIT
trap 'exit 130' INT TERM
for phase in $PHASES; do
    if [ -z "${BUDGET[$phase]:-}" ]; then
        say "unknown phase $phase (known: ${!BUDGET[*]})"
        continue
    fi
    run_phase "$phase"
    if [ "$phase" = env ] && [ -s "$WORK/cuda.env" ]; then
        # shellcheck source=/dev/null
        . "$WORK/cuda.env"
        say "CPATH=${CPATH:-} (headers the toolkit or the interpreter lacks)"
    fi
done
