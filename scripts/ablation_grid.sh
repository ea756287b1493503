#!/usr/bin/env bash
# The QwenLong-L1 ablation grid: SFT only, SFT + one RL phase, SFT + phased RL, and SFT +
# phased RL + retrospective sampling (the hard-sample buffer), each with several seeds, on
# the embedded synthetic tasks (by default the harder mix: chain, aggregate, docqa_choice),
# then a table of held-out pass@1 means with 95% intervals (scripts/grid_table.py).
#
#   scripts/ablation_grid.sh                               # 3 seeds, 1,100 held-out questions per length
#   scripts/ablation_grid.sh --mix retrieval               # single-fact retrieval, no distractors
#   scripts/ablation_grid.sh --seeds "1 2 3 4 5" --tag five
#   scripts/ablation_grid.sh --smoke                       # a few steps of everything, to try the plumbing
#   scripts/ablation_grid.sh --set mix=0.5 --set buffer_policy=importance --tag mix50
#
# Per seed it runs scripts/qwenlong_l1.rhai (which trains the warm-up SFT, evaluates it: the
# "SFT only" row, and runs the full recipe), then scripts/ablation_single_phase.rhai and
# scripts/ablation_no_retrospective.rhai from that seed's SFT checkpoint. `--seed` varies the
# SFT initialization, the RL sampling and the evaluation sampling together.
#
# Held-out size: each question is answered 4 times at T = 0.7; its pass@1 lies in [0, 1], so
# its variance is at most 1/4, and 1,100 questions per length give a 95% interval of at most
# 1.96 * 0.5 / sqrt(1100) = 2.95 points for one run. The table shows that per-run interval
# beside the interval across seeds (Student t over the seeds' means).
#
# Task mixes (`--mix`): `harder` (chain, aggregate, docqa_choice with 6 distractors; SFT on
# 14,400 traces at 192 tokens; answers up to 128 tokens, as their traces run to 114) and
# `retrieval` (the quickstart's tasks: one fact, no distractors, answers up to 48 tokens).
#
# Wall time on 2 CPU cores (release build), measured with `--mix retrieval`: about 6 minutes
# per seed at the recipes' L1/L2 = 256/512 and 17 at `--set l1=512 --set l2=1024 --set
# 'eval_lengths=[512,1024,2048]'` (the evaluations of 3,300 questions x 4 samples dominate). Runs that already finished (every stage ok in their
# report.json) are skipped, so an interrupted grid continues.
set -euo pipefail

seeds="1 2 3"
mix="harder"
tag=""
eval_count=1100
extra=()
smoke=false
while [ $# -gt 0 ]; do
    case "$1" in
        --seeds) seeds="$2"; shift 2 ;;
        --mix) mix="$2"; shift 2 ;;
        --tag) tag="$2"; shift 2 ;;
        --eval-count) eval_count="$2"; shift 2 ;;
        --set) extra+=(--set "$2"); shift 2 ;;
        --smoke) smoke=true; shift ;;
        -h|--help) sed -n '2,31p' "$0"; exit 0 ;;
        *) echo "error: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

cd "$(dirname "$0")/.."
longrl="${LONGRL:-target/release/longrl}"
if [ ! -x "$longrl" ]; then
    cargo build --release --bin longrl
fi

case "$mix" in
    harder) tasks=(--set 'kinds=["chain","aggregate","docqa_choice"]' --set distractors=6 --set sft_length=192)
            budget=(--set sft_count=14400 --set max_output=128 --set overlong_buffer=16) ;;
    retrieval) tasks=(--set 'kinds=["retrieval"]' --set distractors=0 --set sft_length=64)
               budget=(--set sft_count=4800 --set max_output=48 --set overlong_buffer=8) ;;
    *) echo "error: unknown mix $mix (harder or retrieval)" >&2; exit 2 ;;
esac
tag="${tag:-$mix}"
common=("${tasks[@]}" "${budget[@]}" --set "eval_count=$eval_count")
if $smoke; then
    tag="smoke-$tag"
    common=("${tasks[@]}" --set eval_count=4 --set sft_count=32
            --set tasks=16 --set steps1=1 --set steps2=1 --set prompts=2 --set group=2 --set mini_batch=2
            --set eval_lengths=[256,512] --set max_output=32)
fi

# Runs one recipe unless its run directory already holds a finished run.
run() {
    local name="$1"; shift
    if python3 -c 'import json, sys; r = json.load(open(sys.argv[1])); sys.exit(r["interrupted"] or any(s["status"] != "ok" for s in r["stages"]))' \
        "runs/$name/report.json" 2>/dev/null; then
        echo "ablation grid: runs/$name is done, skipping"
        return
    fi
    rm -rf "runs/$name"
    echo "ablation grid: running $name"
    "$longrl" run "$@" --name "$name" "${common[@]}" "${extra[@]}"
}

dirs=()
for seed in $seeds; do
    full="grid-$tag-s$seed-qwenlong_l1"
    run "$full" scripts/qwenlong_l1.rhai --seed "$seed" --set "seed=$seed"
    sft_dir=$(ls -d "runs/$full"/sft-* | head -n 1)
    for recipe in ablation_single_phase ablation_no_retrospective; do
        name="grid-$tag-s$seed-$recipe"
        run "$name" "scripts/$recipe.rhai" --seed "$seed" --set "seed=$seed" --set "start=$sft_dir" --set eval_sft=false
        dirs+=("runs/$name")
    done
    dirs+=("runs/$full")
done

out="runs/grid-$tag-table.md"
python3 scripts/grid_table.py "${dirs[@]}" > "$out"
cat "$out"
echo "ablation grid: table written to $out"
