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
#   scripts/ablation_grid.sh --recipes "qwenlong_l1 ablation_no_retrospective" --tag base
#   scripts/ablation_grid.sh --recipes qwenlong_l1 --start-from base --set buffer_scores=final --tag final
#                                                          # a buffer sweep from base's SFT checkpoints
#
# Per seed it runs scripts/qwenlong_l1.rhai (which trains the warm-up SFT, evaluates it: the
# "SFT only" row, and runs the full recipe), then scripts/ablation_single_phase.rhai and
# scripts/ablation_no_retrospective.rhai from that seed's SFT checkpoint. `--seed` varies the
# SFT initialization, the RL sampling and the evaluation sampling together. `--recipes` runs
# only the recipes it names; `--start-from TAG` starts every recipe (qwenlong_l1 included,
# which then trains and evaluates no SFT) from the SFT checkpoints of grid TAG's seeds, so a
# sweep of the buffer's settings pairs with that grid's runs without training its SFT again
# (the table then shows the base grid's SFT and recipes beside this grid's runs).
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
recipes="qwenlong_l1 ablation_single_phase ablation_no_retrospective"
start_from=""
while [ $# -gt 0 ]; do
    case "$1" in
        --seeds) seeds="$2"; shift 2 ;;
        --mix) mix="$2"; shift 2 ;;
        --tag) tag="$2"; shift 2 ;;
        --eval-count) eval_count="$2"; shift 2 ;;
        --set) extra+=(--set "$2"); shift 2 ;;
        --smoke) smoke=true; shift ;;
        --recipes) recipes="$2"; shift 2 ;;
        --start-from) start_from="$2"; shift 2 ;;
        -h|--help) sed -n '2,38p' "$0"; exit 0 ;;
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

# The SFT checkpoint of one seed's qwenlong_l1 run of grid $1.
sft_checkpoint() {
    local dir
    dir=$(ls -d "runs/grid-$1-s$2-qwenlong_l1"/sft-* 2>/dev/null | head -n 1)
    if [ -z "$dir" ]; then
        echo "error: no SFT checkpoint in runs/grid-$1-s$2-qwenlong_l1 (run grid $1 with qwenlong_l1 first)" >&2
        exit 1
    fi
    echo "$dir"
}

for recipe in $recipes; do
    if [ ! -f "scripts/$recipe.rhai" ]; then
        echo "error: unknown recipe $recipe (qwenlong_l1, ablation_single_phase, ablation_no_retrospective)" >&2
        exit 2
    fi
done
if [ -z "$start_from" ] && [[ " $recipes " != *" qwenlong_l1 "* ]]; then
    echo "error: without qwenlong_l1 (whose warm-up SFT the others start from), --start-from TAG is needed" >&2
    exit 2
fi

dirs=()
for seed in $seeds; do
    seeded=(--seed "$seed" --set "seed=$seed")
    full="grid-$tag-s$seed-qwenlong_l1"
    if [ -n "$start_from" ]; then
        sft_dir=$(sft_checkpoint "$start_from" "$seed")
        from_sft=(--set "start=$sft_dir" --set eval_sft=false)
        # The base grid's runs of this seed come first in the table, so that this grid's
        # evaluations replace theirs of the same name and pair with the rest.
        for base in "runs/grid-$start_from-s$seed"-*/; do
            dirs+=("${base%/}")
        done
    elif [[ " $recipes " == *" qwenlong_l1 "* ]]; then
        run "$full" scripts/qwenlong_l1.rhai "${seeded[@]}"
        dirs+=("runs/$full")
        sft_dir=$(sft_checkpoint "$tag" "$seed")
        from_sft=(--set "start=$sft_dir" --set eval_sft=false)
    fi
    for recipe in $recipes; do
        name="grid-$tag-s$seed-$recipe"
        if [ "$recipe" = qwenlong_l1 ] && [ -z "$start_from" ]; then
            continue
        fi
        run "$name" "scripts/$recipe.rhai" "${seeded[@]}" "${from_sft[@]}"
        dirs+=("runs/$name")
    done
done

out="runs/grid-$tag-table.md"
python3 scripts/grid_table.py "${dirs[@]}" > "$out"
cat "$out"
echo "ablation grid: table written to $out"
