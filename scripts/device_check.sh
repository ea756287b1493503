#!/usr/bin/env bash
# The device check: one command that runs every check that needs the device (golden logits and
# gradients, throughput, memory, a short RL run) and writes one summary file.
#
#   scripts/device_check.sh cpu                         # build here and check on the CPU backend
#   scripts/device_check.sh cuda --bundle .device/cuda.tar.xz    # here: build, pack executables
#   scripts/device_check.sh cuda --prebuilt .device/cuda.tar.xz  # on the GPU machine: check
#
# A lent GPU machine has neither Rust nor network, so the CUDA check runs in two halves: this
# machine builds the binary and the golden test executables with the feature (`--bundle`:
# stripped, in one xz archive of about 40 MB that travels with the working tree), and the GPU
# machine runs them from a copy of the repository (`--prebuilt`: no cargo there; the tests
# read their fixtures from this checkout through CARGO_MANIFEST_DIR). Without either flag the
# script builds and checks on the same machine, as CI does with `cpu`.
#
# Steps (each timed; a failed step is marked FAIL and the others still run):
#   build        the longrl binary and the golden test executables with the feature
#   golden-*     on the device: logits against transformers' in f32 (tests/model.rs) and in
#                bf16-mixed within bf16 tolerance (tests/precision.rs); the linear-memory
#                attention's value and gradients against plain attention (tests/long_inputs.rs)
#   bench-*      `longrl bench model` in f32 and in bf16-mixed: tokens/s, model FLOP rate and,
#                with PEAK_TFLOPS_F32 / PEAK_TFLOPS_BF16 set, model FLOP utilisation
#   torch-*      examples/bench/transformers_bench.py on the same shapes and device, in f32
#                and in bf16-mixed: the side-by-side figures (always on CUDA, where the GPU
#                image's python3 has torch; on the CPU only where DEVICE_CHECK_PYTHON has it)
#   rollouts     `longrl bench rollout` with the tokens drawn on the host and on the device
#                (untruncated, then top-p 0.95): what copying the logits back costs
#   rl-*         a short SFT + RL phase on the embedded tiny model (scripts/device_check.rhai)
#                in f32 and in bf16-mixed, with an evaluation sharing the device
#   memory-*     `longrl bench memory` (one RL step) at growing lengths; on CUDA also the
#                device memory nvidia-smi saw (peak RSS is host memory)
# The most telling steps come first, so that a lease that runs out leaves them done.
#
# The summary is $DEVICE_CHECK_SUMMARY (default $DEVICE_CHECK_OUT/summary.md), appended after
# every step; each step's full output is in $DEVICE_CHECK_OUT (default
# target/device_check/BACKEND/). Exit status: 0 when every step passed.
#
# Settings (environment): DEVICE_CHECK_PROFILE=release|dev (default release; CI uses dev to
# reuse the `cargo test` build), DEVICE_CHECK_OUT, DEVICE_CHECK_SUMMARY, PEAK_TFLOPS_F32,
# PEAK_TFLOPS_BF16 (e.g. 67 and 989 for an H100/H200 SXM), DEVICE_CHECK_STEP_TIMEOUT (seconds
# one step may take; default none), DEVICE_CHECK_DEADLINE (seconds for the whole check: a step
# is cut at it, and the steps after it are marked SKIPPED; default none), CUDARC_CUDA_VERSION
# (the CUDA version a bundle is built for where this machine has no nvcc; default 13000),
# DEVICE_CHECK_PYTHON (the Python with torch and transformers for the torch-* steps; default
# python3), DEVICE_CHECK_KERNEL_CACHE=1 (share compiled kernels between the steps, below),
# CARGO_TARGET_DIR.
set -uo pipefail

usage="usage: scripts/device_check.sh cpu|wgpu|cuda [--bundle ARCHIVE.tar.xz|.tar.gz | --prebuilt ARCHIVE|DIR]"
backend="${1:-}"
case "$backend" in
  cpu) features=() ;;
  wgpu | cuda) features=(--features "$backend") ;;
  *) echo "$usage" >&2; exit 2 ;;
esac
mode=build-and-check bundle="" prebuilt=""
case "${2:-}" in
  "") ;;
  --bundle) mode=bundle bundle="${3:?$usage}" ;;
  --prebuilt) mode=prebuilt prebuilt="${3:?$usage}" ;;
  *) echo "$usage" >&2; exit 2 ;;
esac
# Paths given relative to where the script was started from.
case "$bundle" in "" | /*) ;; *) bundle="$(pwd)/$bundle" ;; esac
case "$prebuilt" in "" | /*) ;; *) prebuilt="$(pwd)/$prebuilt" ;; esac
cd "$(dirname "$0")/.."
root="$(pwd)"
# shellcheck source=scripts/device_env.sh
. "$root/scripts/device_env.sh"
profile="${DEVICE_CHECK_PROFILE:-release}"
case "$profile" in
  release) profile_flag=(--release); profile_dir=release ;;
  dev) profile_flag=(); profile_dir=debug ;;
  *) echo "DEVICE_CHECK_PROFILE must be release or dev" >&2; exit 2 ;;
esac
out="${DEVICE_CHECK_OUT:-$root/target/device_check/$backend}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
summary="${DEVICE_CHECK_SUMMARY:-$out/summary.md}"
bin="${CARGO_TARGET_DIR:-$root/target}/$profile_dir/longrl"
# Where the build has no nvcc to ask (this machine), cudarc is told the CUDA version to bind.
if [ "$backend" = cuda ] && ! command -v nvcc >/dev/null; then
  export CUDARC_CUDA_VERSION="${CUDARC_CUDA_VERSION:-13000}"
fi
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
  cpu)
    golden_model=logits_and_greedy_tokens_match_transformers golden_mixed=bf16_logits_match_transformers_within_bf16_tolerance
    golden_attention=linear_memory_attention_matches_plain_attention_in_value_and_gradients ;;
  wgpu)
    golden_model=logits_and_greedy_tokens_match_transformers_on_wgpu golden_mixed=bf16_mixed_on_wgpu_falls_back_to_f32_and_matches
    golden_attention=linear_memory_attention_matches_plain_attention_on_wgpu ;;
  cuda)
    golden_model=logits_and_greedy_tokens_match_transformers_on_cuda golden_mixed=bf16_logits_match_transformers_on_cuda
    golden_attention=linear_memory_attention_matches_plain_attention_on_cuda ;;
esac

failed=() skipped=()
started_all=$(date +%s)
step_timeout="${DEVICE_CHECK_STEP_TIMEOUT:-0}"
deadline="${DEVICE_CHECK_DEADLINE:-0}"
step_ends=0

# step NAME COMMAND...: runs the command (or shell function) with its output in $out/NAME.log,
# and appends its status, time and the output's figure lines to the summary. Its external
# commands run through `bounded`, so the step ends by its share of the time.
step() {
  local name="$1"; shift
  local started=$(date +%s) status=PASS limit=0
  if [ "$step_timeout" -gt 0 ]; then limit=$step_timeout; fi
  if [ "$deadline" -gt 0 ]; then
    local left=$((started_all + deadline - started))
    if [ "$left" -le 5 ]; then
      skipped+=("$name")
      printf '### %s: SKIPPED (the check ran out of its %s s)\n\n' "$name" "$deadline" >>"$summary"
      echo "== $name: skipped, out of time" >&2
      return
    fi
    if [ "$limit" -eq 0 ] || [ "$left" -lt "$limit" ]; then limit=$left; fi
  fi
  if [ "$limit" -gt 0 ]; then step_ends=$((started + limit)); else step_ends=0; fi
  echo "== $name: $*" >&2
  if [ "$(type -t "$1")" = function ]; then
    "$@" >"$out/$name.log" 2>&1 || status=FAIL
  else
    bounded "$@" >"$out/$name.log" 2>&1 || status=FAIL
  fi
  local took=$(($(date +%s) - started))
  if [ "$status" = FAIL ]; then
    failed+=("$name")
    if [ "$step_ends" -gt 0 ] && [ "$(date +%s)" -ge "$step_ends" ]; then status="FAIL (cut at $limit s)"; fi
  fi
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

# bounded COMMAND...: runs a command, stopped (SIGTERM, then SIGKILL 10 s later) when the
# current step's time is up.
bounded() {
  if [ "$step_ends" -gt 0 ]; then
    local left=$((step_ends - $(date +%s)))
    [ "$left" -gt 0 ] || return 124
    timeout --kill-after=10 "$left" "$@"
  else
    "$@"
  fi
}

# The lines of a step's log worth keeping in the summary (figures, verdicts, errors).
figures() {
  case "$1" in
    build*) grep -E '^(error|warning: unused)|Finished|could not compile' "$out/$1.log" ;;
    golden*) grep -E -A1 'max \||worst|test result|panicked|FAILED|skipping|No such file|error while loading' "$out/$1.log" | grep -vE '^(--|stack backtrace:)?$' ;;
    pack | unpack) cat "$out/$1.log" ;;
    rl*) { run_report_lines "$out/$1.log"; grep -E 'by step: ' "$out/$1.log"; } ;;
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
    bounded "$bin" bench memory --backend "$backend" "${memory_args[@]}" --precision "$precision" --lengths "$length" --json || return 1
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
      bounded "$bin" bench rollout --backend "$backend" "${rollout_args[@]}" --top-p "$top_p" --sample-on "$place" --json || return 1
    done
  done
}

# The PyTorch/transformers twin of `bench model` on the same shapes and device, so that
# longrl's figures read as ratios. torch_device: cuda for the CUDA backend, cpu for the CPU one.
python="${DEVICE_CHECK_PYTHON:-python3}"
torch_device=""
case "$backend" in cpu) torch_device=cpu ;; cuda) torch_device=cuda ;; esac
# The twin runs with the library path as it was before the script changed it: PyTorch brings
# its own CUDA libraries.
twin_found="" twin_error=""  # asked once: importing torch takes seconds of a lease
twin_available() {
  if [ -z "$twin_found" ]; then
    twin_found=no
    if [ -n "$torch_device" ] && twin_error="$(restore_library_path; "$python" -c "import sys, torch, transformers
sys.exit(0 if '$torch_device' == 'cpu' or torch.cuda.is_available() else 'torch sees no CUDA device')" 2>&1)"; then
      twin_found=yes
    fi
  fi
  [ "$twin_found" = yes ]
}
torch_twin() {
  local precision="$1" peak="$2"
  if ! twin_available; then
    echo "no $python with torch, transformers and $torch_device here: the twin cannot run"
    echo "$twin_error" | tail -n 3
    return 1
  fi
  (
    restore_library_path
    bounded "$python" "$root/examples/bench/transformers_bench.py" "${bench_args[@]}" --device "$torch_device" \
      --precision "$precision" ${peak:+--peak-tflops "$peak"}
  )
}

# The short RL run at one precision, then its SFT loss and RL reward by step.
rl_run() {
  local precision="$1" metrics="$out/runs/$1/metrics.jsonl"
  rm -rf "$out/runs/$precision"
  bounded "$bin" run scripts/device_check.rhai --backend "$backend" --runs-dir "$out/runs" --name "$precision" --set "precision=$precision" || return 1
  echo "sft loss by step: $(grep '"stage":"sft' "$metrics" | grep -o '"loss":[^,}]*' | cut -d: -f2 | cut -c1-6 | tr '\n' ' ')"
  echo "rl reward_mean by step: $(grep '"stage":"rl_phase' "$metrics" | grep -o '"reward_mean":[^,}]*' | cut -d: -f2 | cut -c1-6 | tr '\n' ' ')"
}

# The test executables the golden steps run, by test name, from cargo's JSON messages.
declare -A test_exe=()
test_names=(model precision long_inputs)
build_tests() {
  rm -f "$out/test-executables.txt"  # a failed build must not leave an older list to pack
  bounded cargo test --locked "${profile_flag[@]}" "${features[@]}" "${test_names[@]/#/--test=}" --no-run --message-format=json-render-diagnostics >"$out/test-artifacts.json" || return 1
  python3 - "$out/test-artifacts.json" >"$out/test-executables.txt" <<'PY' || return 1
import json, sys
for line in open(sys.argv[1]):
    if line.startswith("{"):
        message = json.loads(line)
        if message.get("reason") == "compiler-artifact" and "test" in message["target"]["kind"] and message.get("executable"):
            print(message["target"]["name"], message["executable"])
PY
  cat "$out/test-executables.txt"
}
read_test_executables() {
  local name path
  while read -r name path; do test_exe[$name]="$path"; done <"$1"
}

# golden TEST FILTER: one test of a test executable, run from engine/ as cargo would, with
# the fixtures of this checkout.
golden() {
  local exe="${test_exe[$1]:-}"
  if [ -z "$exe" ] || [ ! -x "$exe" ]; then echo "no executable for the test $1 (${exe:-not built})"; return 1; fi
  (cd "$root/engine" && CARGO_MANIFEST_DIR="$root/engine" bounded "$exe" "$2" --exact --nocapture)
}

# pack ARCHIVE: the binary and the test executables, stripped, in one archive with a manifest.
pack() {
  local staging="$out/bundle-staging" name
  rm -rf "$staging" && mkdir -p "$staging/tests" || return 1
  cp "$bin" "$staging/longrl" || return 1
  for name in "${test_names[@]}"; do cp "${test_exe[$name]}" "$staging/tests/$name" || return 1; done
  strip "$staging/longrl" "$staging"/tests/* || return 1
  {
    echo "backend: $backend"
    echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD 2>/dev/null || echo ' (with uncommitted changes)')"
    echo "profile: $profile"
    echo "built: $(date -u '+%Y-%m-%d %H:%M UTC') on $(uname -m), $(ldd --version | head -n 1)"
    if [ -n "${CUDARC_CUDA_VERSION:-}" ]; then echo "cudarc CUDA version: $CUDARC_CUDA_VERSION"; fi
  } >"$staging/BUNDLE.txt"
  mkdir -p "$(dirname "$bundle")" || return 1
  case "$bundle" in
    # One xz stream over all four (the executables share most of their code): the smallest.
    *.tar.xz) tar cf - -C "$staging" . | xz -9e -T1 >"$bundle" || return 1 ;;
    *.tar.gz) tar czf "$bundle" -C "$staging" . || return 1 ;;
    *) echo "the bundle's name must end in .tar.xz or .tar.gz"; return 1 ;;
  esac
  cat "$staging/BUNDLE.txt"
  du -h "$staging/longrl" "$staging"/tests/* "$bundle" | sed "s|$out/bundle-staging/||; s|$root/||"
  # What a device session sends: the committed files, plus the archive (64 MiB in all there).
  local tracked
  tracked=$(git ls-files -z 2>/dev/null | xargs -0 stat -c %s 2>/dev/null | awk '{ s += $1 } END { print s + 0 }')
  echo "tracked files + bundle: $(( (tracked + $(stat -c %s "$bundle")) / 1048576 )) MiB"
  rm -rf "$staging"
}

# unpack: the prebuilt archive (or folder) from --bundle, in place of a build.
unpack() {
  local dir="$prebuilt" name
  if [ -f "$prebuilt" ]; then
    dir="$out/bundle"
    rm -rf "$dir" && mkdir -p "$dir" || return 1
    unpack_archive "$prebuilt" "$dir" || return 1
  fi
  cat "$dir/BUNDLE.txt" || return 1
  grep -qx "backend: $backend" "$dir/BUNDLE.txt" || { echo "the bundle was built for another backend"; return 1; }
  bin="$dir/longrl"
  for name in "${test_names[@]}"; do test_exe[$name]="$dir/tests/$name"; done
  "$bin" --version || return 1
}

# Every step is its own process, and each compiles the same kernels again (NVRTC on CUDA).
# cubecl keeps compiled kernels across processes only when its config (cubecl.toml, looked for
# in the working directory and its parents) names a cache. With DEVICE_CHECK_KERNEL_CACHE=1,
# where the checkout has none, one is written for the check's duration, the cache under
# $out/cubecl-cache. Off by default: cubecl's CUDA kernel cache has not run here yet, and a
# lease is too short to find out with every step; the first GPU run's step times say whether
# compiling is worth saving.
share_compiled_kernels() {
  if [ -e "$root/cubecl.toml" ]; then echo "- compiled kernels: as $root/cubecl.toml says"; return; fi
  printf '# Written by scripts/device_check.sh for its run; removed when it ends.\n[compilation]\ncache = { file = "%s" }\n' \
    "$out/cubecl-cache" >"$root/cubecl.toml" || return
  trap 'rm -f "$root/cubecl.toml"' EXIT
  echo "- compiled kernels: shared between the steps through $out/cubecl-cache"
}

{
  echo "# Device check: $backend ($mode)"
  echo
  echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown), profile $profile"
  echo "- host: $(nproc) CPU cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo)"
  if [ "$backend" = cuda ] && command -v nvidia-smi >/dev/null; then
    echo "- device: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | head -n 1)"
  fi
  if [ "$backend" = cuda ] && [ "$mode" = prebuilt ]; then cuda_libraries; fi
  if [ "$backend" != cpu ]; then
    # How hard cubecl tunes each new kernel shape before using it (minimal saves a lease's time).
    echo "- cubecl autotune level: ${CUBECL_AUTOTUNE_LEVEL:-balanced (the default)}"
    if [ "$mode" != bundle ] && [ "${DEVICE_CHECK_KERNEL_CACHE:-0}" = 1 ]; then share_compiled_kernels; fi
  fi
  echo
} >"$summary"

if [ "$mode" = prebuilt ]; then
  step unpack unpack
else
  step build cargo build --locked "${profile_flag[@]}" "${features[@]}" --bin longrl
  step build-tests build_tests
  read_test_executables "$out/test-executables.txt" 2>/dev/null
fi
if [ "$mode" = bundle ]; then
  step pack pack
else
  step golden-f32 golden model "$golden_model"
  step golden-bf16 golden precision "$golden_mixed"
  step golden-attention golden long_inputs "$golden_attention"
  step bench-f32 "$bin" bench model --backend "$backend" "${bench_args[@]}" --precision f32 ${PEAK_TFLOPS_F32:+--peak-tflops "$PEAK_TFLOPS_F32"}
  step bench-bf16 "$bin" bench model --backend "$backend" "${bench_args[@]}" --precision bf16-mixed ${PEAK_TFLOPS_BF16:+--peak-tflops "$PEAK_TFLOPS_BF16"}
  if [ "$backend" = cuda ] || twin_available; then
    step torch-f32 torch_twin f32 "${PEAK_TFLOPS_F32:-}"
    step torch-bf16 torch_twin bf16-mixed "${PEAK_TFLOPS_BF16:-}"
  fi
  step rollouts rollouts
  step rl-f32 rl_run f32
  step rl-bf16 rl_run bf16-mixed
  step memory-f32 memory f32
  step memory-bf16 memory bf16-mixed
fi

took=$(($(date +%s) - started_all))
if [ ${#failed[@]} -gt 0 ]; then
  verdict="FAILED: ${failed[*]}${skipped:+; out of time before: ${skipped[*]}}"
elif [ ${#skipped[@]} -gt 0 ]; then
  verdict="INCOMPLETE, out of time before: ${skipped[*]}"
else
  verdict="all steps passed"
fi
echo "**$verdict** in $took s" >>"$summary"
echo "device check ($backend, $mode): $verdict in $took s; summary: $summary" >&2
[ ${#failed[@]} -eq 0 ] && [ ${#skipped[@]} -eq 0 ]
