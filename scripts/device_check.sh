#!/usr/bin/env bash
# The device check: one command that, on a machine with the device, builds longrl with the
# backend's feature and runs every check that needs the device, writing one summary file.
#
#   scripts/device_check.sh cuda     # on a GPU machine (no network needed once crates are cached)
#   scripts/device_check.sh cpu      # the same checks on the CPU backend, in a few minutes
#
# Steps (each timed; a failed step is marked FAIL and the others still run):
#   1. build      the longrl binary and the golden tests with the feature
#   2. golden     the golden logit tests on the device: f32 against transformers' logits
#                 (tests/model.rs) and bf16-mixed within bf16 tolerance (tests/precision.rs)
#   3. bench      `longrl bench model` in f32 and in bf16-mixed: tokens/s, model FLOP rate and,
#                 with PEAK_TFLOPS_F32 / PEAK_TFLOPS_BF16 set, model FLOP utilisation
#   4. memory     `longrl bench memory` (one RL step) at growing lengths; on CUDA also the
#                 device memory nvidia-smi saw (peak RSS is host memory)
#   5. rollouts   `longrl bench rollout` with the tokens drawn on the host and on the device
#                 (untruncated, then top-p 0.95): what copying the logits back costs
#   6. rl         a short SFT + RL phase on the embedded tiny model (scripts/device_check.rhai)
#                 in f32 and in bf16-mixed, with an evaluation sharing the device
#
# The summary is $DEVICE_CHECK_OUT/summary.md (default target/device_check/BACKEND/), each
# step's full output beside it. Exit status: 0 when every step passed.
#
# Settings (environment): DEVICE_CHECK_PROFILE=release|dev (default release; CI uses dev to
# reuse the `cargo test` build), DEVICE_CHECK_OUT, PEAK_TFLOPS_F32, PEAK_TFLOPS_BF16 (e.g. 67
# and 989 for an H100/H200 SXM), CARGO_TARGET_DIR.
set -uo pipefail

backend="${1:-}"
case "$backend" in
  cpu) features=() ;;
  wgpu | cuda) features=(--features "$backend") ;;
  *) echo "usage: scripts/device_check.sh cpu|wgpu|cuda" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/.."
root="$(pwd)"
profile="${DEVICE_CHECK_PROFILE:-release}"
case "$profile" in
  release) profile_flag=(--release); profile_dir=release ;;
  dev) profile_flag=(); profile_dir=debug ;;
  *) echo "DEVICE_CHECK_PROFILE must be release or dev" >&2; exit 2 ;;
esac
out="${DEVICE_CHECK_OUT:-$root/target/device_check/$backend}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
summary="$out/summary.md"
bin="${CARGO_TARGET_DIR:-$root/target}/$profile_dir/longrl"
# The golden tests fail, rather than skip, when the device is missing.
export LONGRL_REQUIRE_DEVICE=1
export CARGO_TERM_COLOR=never

# Shapes: the tiny preset on the CPU; a 0.5B shape and long inputs on a GPU.
if [ "$backend" = cpu ]; then
  bench_args=(--preset tiny --prompt-len 256 --new-tokens 32 --group 4 --train-batch 2 --train-seq 256)
  memory_args=(--preset tiny --group 4 --response-tokens 64)
  lengths=(512 1024 2048)
  rollout_args=(--preset tiny --prompts 4 --group 4 --prompt-len 128 --new-tokens 16)
else
  bench_args=(--preset qwen2-0.5b --vocab 151936 --prompt-len 2048 --new-tokens 64 --group 8 --train-batch 4 --train-seq 2048)
  memory_args=(--preset qwen2-0.5b --group 8 --response-tokens 256)
  lengths=(4096 16384 32768)
  rollout_args=(--preset qwen2-0.5b --vocab 151936 --prompts 8 --group 8 --prompt-len 512 --new-tokens 32)
fi
case "$backend" in
  cpu) golden_model=logits_and_greedy_tokens_match_transformers golden_mixed=bf16_logits_match_transformers_within_bf16_tolerance ;;
  wgpu) golden_model=logits_and_greedy_tokens_match_transformers_on_wgpu golden_mixed=bf16_mixed_on_wgpu_falls_back_to_f32_and_matches ;;
  cuda) golden_model=logits_and_greedy_tokens_match_transformers_on_cuda golden_mixed=bf16_logits_match_transformers_on_cuda ;;
esac

failed=()
started_all=$(date +%s)

# step NAME COMMAND...: runs the command with its output in $out/NAME.log, and appends its
# status, time and the output's figure lines to the summary.
step() {
  local name="$1"; shift
  local started=$(date +%s) status=PASS
  echo "== $name: $*" >&2
  if ! "$@" >"$out/$name.log" 2>&1; then status=FAIL; failed+=("$name"); fi
  local took=$(($(date +%s) - started))
  {
    echo "### $name: $status ($took s)"
    echo
    echo '```'
    echo "\$ $*" | sed "s|$root/||g"
    figures "$name" | tail -n 40
    echo '```'
    echo
  } >>"$summary"
  echo "   $status in $took s" >&2
}

# The lines of a step's log worth keeping in the summary (figures, verdicts, errors).
figures() {
  case "$1" in
    build*) grep -E '^(error|warning: unused)|Finished|could not compile' "$out/$1.log" ;;
    golden*) grep -E 'max \||worst|test result|panicked|FAILED|skipping' "$out/$1.log" ;;
    rl*) grep -E '^(sft|rl_phase|evaluate)#[0-9]+ |^total wall|^  (sft|rl_phase)#[0-9]+: |by step: |ERROR|^(error|Error)' "$out/$1.log" ;;
    *) grep -vE '^\s*$|^\s*(Compiling|Running|Finished)' "$out/$1.log" ;;
  esac
}

# One memory bench per length; on CUDA, nvidia-smi samples the device memory meanwhile.
memory() {
  local precision="$1" length sampler=""
  for length in "${lengths[@]}"; do
    if [ "$backend" = cuda ] && command -v nvidia-smi >/dev/null; then
      nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 >"$out/gpu_mem_${precision}_${length}.txt" &
      sampler=$!
    fi
    "$bin" bench memory --backend "$backend" "${memory_args[@]}" --precision "$precision" --lengths "$length" --json || return 1
    if [ -n "$sampler" ]; then
      kill "$sampler" 2>/dev/null; wait "$sampler" 2>/dev/null
      echo "device memory used, peak: $(sort -n "$out/gpu_mem_${precision}_${length}.txt" | tail -n 1) MiB at length $length"
      sampler=""
    fi
  done
}

# Rollouts with the tokens drawn on the host, then on the device, without and with top-p.
rollouts() {
  local top_p place
  for top_p in 1.0 0.95; do
    for place in host device; do
      "$bin" bench rollout --backend "$backend" "${rollout_args[@]}" --top-p "$top_p" --sample-on "$place" --json || return 1
    done
  done
}

# The short RL run at one precision, then its SFT loss and RL reward by step.
rl_run() {
  local precision="$1" metrics="$out/runs/$1/metrics.jsonl"
  rm -rf "$out/runs/$precision"
  "$bin" run scripts/device_check.rhai --backend "$backend" --runs-dir "$out/runs" --name "$precision" --set "precision=$precision" || return 1
  echo "sft loss by step: $(grep '"stage":"sft' "$metrics" | grep -o '"loss":[^,}]*' | cut -d: -f2 | cut -c1-6 | tr '\n' ' ')"
  echo "rl reward_mean by step: $(grep '"stage":"rl_phase' "$metrics" | grep -o '"reward_mean":[^,}]*' | cut -d: -f2 | cut -c1-6 | tr '\n' ' ')"
}

{
  echo "# Device check: $backend"
  echo
  echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown), profile $profile"
  echo "- host: $(nproc) CPU cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo)"
  if [ "$backend" = cuda ] && command -v nvidia-smi >/dev/null; then
    echo "- device: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | head -n 1)"
  fi
  echo
} >"$summary"

step build cargo build --locked "${profile_flag[@]}" "${features[@]}" --bin longrl
step build-tests cargo test --locked "${profile_flag[@]}" "${features[@]}" --test model --test precision --no-run
step golden-f32 cargo test --locked "${profile_flag[@]}" "${features[@]}" --test model "$golden_model" -- --exact --nocapture
step golden-bf16 cargo test --locked "${profile_flag[@]}" "${features[@]}" --test precision "$golden_mixed" -- --exact --nocapture
step bench-f32 "$bin" bench model --backend "$backend" "${bench_args[@]}" --precision f32 ${PEAK_TFLOPS_F32:+--peak-tflops "$PEAK_TFLOPS_F32"}
step bench-bf16 "$bin" bench model --backend "$backend" "${bench_args[@]}" --precision bf16-mixed ${PEAK_TFLOPS_BF16:+--peak-tflops "$PEAK_TFLOPS_BF16"}
step memory-f32 memory f32
step memory-bf16 memory bf16-mixed
step rollouts rollouts
step rl-f32 rl_run f32
step rl-bf16 rl_run bf16-mixed

took=$(($(date +%s) - started_all))
if [ ${#failed[@]} -eq 0 ]; then verdict="all steps passed"; else verdict="FAILED: ${failed[*]}"; fi
echo "**$verdict** in $took s" >>"$summary"
echo "device check ($backend): $verdict in $took s; summary: $summary" >&2
[ ${#failed[@]} -eq 0 ]
