#!/usr/bin/env bash
# Rollouts per second in process against two `longrl serve` rollout servers on 127.0.0.1,
# on the same machine: `score_difficulty` (pure rollouts: G samples per task, scored) over
# the same tasks with the same seeds, once in the stage's process and once on the servers.
# Usage: scripts/bench_remote_rollouts.sh [TASKS] [GROUP] [MAX_OUTPUT]  (after cargo build --release
# or with LONGRL=path/to/longrl; IN_FLIGHT=N requests waiting on each server, default 2: 1 leaves
# a server nothing to batch).
set -euo pipefail
cd "$(dirname "$0")/.."
LONGRL=$(realpath "${LONGRL:-target/release/longrl}")
TASKS=${1:-16}; GROUP=${2:-8}; MAX_OUTPUT=${3:-48}; IN_FLIGHT=${IN_FLIGHT:-2}
WORK=$(mktemp -d); trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$WORK"' EXIT
TINY=$PWD/examples/models/tiny
recipe() {  # $1: the rollout option ("" for in process)
  cat <<RHAI
let policy = model("$TINY", #{ init: "random", init_std: 0.08, seed: 3 });
let tasks = synthetic(#{ count: $TASKS, lengths: [128], tokenizer: "$TINY", kinds: ["retrieval"], distractors: 0, seed: 1 });
let rule = reward(#{ script: |response, record| if response.contains(record.answers[0]) { 1.0 } else { 0.0 } });
score_difficulty(policy, tasks, #{ reward: rule, group: $GROUP, max_output: $MAX_OUTPUT, seed: 2 $1 }).output("records").write_jsonl("scored.jsonl");
RHAI
}
wall() { grep -o 'score_difficulty#[0-9]* *ok *[0-9]* *[0-9]* *[0-9.]*' "$1" | awk '{print $NF}'; }
recipe "" > "$WORK/local.rhai"
(cd "$WORK" && "$LONGRL" run local.rhai --runs-dir runs --name local > local.out 2>&1)
for i in 1 2; do
  "$LONGRL" serve --model "$WORK/runs/local/model-0" --port 0 --served-model-name tiny > "$WORK/serve$i.out" 2>&1 &
done
for i in 1 2; do until grep -q http "$WORK/serve$i.out" 2>/dev/null; do sleep 0.2; done; done
URLS=$(for i in 1 2; do grep -o 'http://[0-9.:]*/v1' "$WORK/serve$i.out"; done | sed 's/.*/"&"/' | paste -sd, -)
recipe ", rollout: #{ urls: [$URLS], model: \"tiny\", flavor: \"longrl\", max_in_flight: $IN_FLIGHT }" > "$WORK/remote.rhai"
(cd "$WORK" && "$LONGRL" run remote.rhai --runs-dir runs --name remote > remote.out 2>&1)
cmp -s "$WORK/runs/local/scored.jsonl" "$WORK/runs/remote/scored.jsonl" && same=yes || same=no
L=$(wall "$WORK/local.out"); R=$(wall "$WORK/remote.out")
ROLLOUTS=$((TASKS * GROUP))
awk -v l="$L" -v r="$R" -v n="$ROLLOUTS" -v same="$same" 'BEGIN {
  printf "%d rollouts (%d-token cap): in process %.2f s (%.1f rollouts/s), two servers %.2f s (%.1f rollouts/s): ratio %.2f; same samples: %s\n",
    n, '"$MAX_OUTPUT"', l, n / l, r, n / r, l / r, same }'
