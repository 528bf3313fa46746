#!/usr/bin/env bash
# The one-GPU check (under 8 minutes on one H200), one JSON line per figure on stdout; everything else
# goes to stderr.
#
#   1. layer overhead, bf16 on CUDA          benchmarks/layer_overhead.py --quick
#   2. MTL-LoRA mixed batch, bf16 on CUDA    benchmarks/mixed_batch.py --quick
#   3. end-to-end training on 1 Ray worker   benchmarks/gpu_check.py (NCCL, bf16 autocast, SDPA): the embedded
#      model and a random-initialised Qwen2.5-1.5B-shape model, tokens/s and MFU beside HF Trainer + PEFT,
#      peak GPU memory
#
# Usage:
#   bash benchmarks/gpu_check.sh            # on a machine with one CUDA GPU
#   bash benchmarks/gpu_check.sh --dry-run  # on CPU: tiny sizes, a few steps (keeps the script working in CI)
#
# Environment: PYTHON (default python), RLORA_CACHE (where the embedded model is prepared:
# `python -m rlora.models`). Exit status: 0 when every part ran, 1 otherwise (each failed part prints a
# JSON line with "error").
set -uo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here/.."
py="${PYTHON:-python}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false

dry=0
case "${1:-}" in
  --dry-run) dry=1 ;;
  "") ;;
  *) echo "gpu_check.sh: unknown argument '$1': pass --dry-run or nothing" >&2; exit 2 ;;
esac

if (( dry )); then
  micro=(--device cpu --dtype bfloat16 --rounds 2 --per-round 1)
  layer=(--tokens 64); mixed=(--seq 4); e2e=(--dry-run)
  limits=(300 300 900)
else
  micro=(--device cuda --dtype bfloat16 --quick)
  layer=(); mixed=(); e2e=()
  limits=(60 60 330)
fi

status=0
# part NAME SECONDS COMMAND...: run under a time limit; its --json last line becomes one line per figure
part() {
  local name=$1 limit=$2; shift 2
  local out; out="$(mktemp)"
  local t0=$SECONDS
  timeout "$limit" "$@" >"$out"
  local rc=$?
  head -n -1 "$out" >&2
  local last; last="$(tail -n 1 "$out")"
  rm -f "$out"
  if (( rc == 0 )) && "$py" benchmarks/gpu_check.py --flatten "$name" <<<"$last"; then
    echo "gpu_check: $name done in $((SECONDS - t0)) s" >&2
  else
    local why="exit status $rc"
    (( rc == 124 )) && why="over its ${limit} s limit"
    echo "{\"check\": \"$name\", \"error\": \"$why\"}"
    status=1
  fi
}

part layer_overhead "${limits[0]}" "$py" benchmarks/layer_overhead.py --json "${micro[@]}" "${layer[@]}"
part mixed_batch "${limits[1]}" "$py" benchmarks/mixed_batch.py --json "${micro[@]}" "${mixed[@]}"
part e2e "${limits[2]}" "$py" benchmarks/gpu_check.py --json "${e2e[@]}"
exit $status
