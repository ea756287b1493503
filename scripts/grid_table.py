"""The ablation table of scripts/ablation_grid.sh: held-out pass@1 by recipe and input length,
the mean over seeds with two 95% intervals, from the evaluations' items.jsonl files.

    python3 scripts/grid_table.py runs/grid-harder-s1-qwenlong_l1 runs/grid-harder-s2-... > table.md

Each run directory holds one folder per `evaluate` stage (sft, single_phase,
no_retrospective, qwenlong_l1) with items.jsonl: one line per held-out question with its
length bucket and its pass@1 (mean score over its samples). For a recipe and a length:
- mean: the mean over seeds of each run's pass@1 (mean over its questions);
- ± seeds: half-width of the 95% Student-t interval of that mean across seeds (training,
  sampling and evaluation noise together; needs 2 seeds or more);
- ± eval: the mean over runs of each run's own 95% interval from its questions
  (1.96 sd / sqrt(n)): the noise of the held-out set alone.
A second table pairs the runs by seed (a seed's recipes share its warm-up SFT) and gives
what each idea adds over the recipe without it: the per-seed difference of pass@1, its mean
and 95% t-interval across seeds, and how many seeds gained. Pairing removes the spread of the
SFT starting points, which dominates the first table's across-seed intervals.
It also lists what the hard-sample buffers carried (from the runs' stage summaries).
Where two run directories of one seed hold an evaluation of the same name, the later one on
the command line counts (a sweep's runs listed after the base grid's replace them).
Standard library only.
"""

import json
import math
import pathlib
import re
import statistics
import sys

ORDER = [("sft", "SFT only"), ("single_phase", "SFT + one RL phase"), ("no_retrospective", "SFT + phased RL"),
         ("qwenlong_l1", "SFT + phased RL + retrospective buffer")]
# Each idea's gain: (label, recipe with it, recipe without it).
GAINS = [("one RL phase over SFT only", "single_phase", "sft"),
         ("phased RL over one phase (curriculum)", "no_retrospective", "single_phase"),
         ("retrospective buffer over phased RL", "qwenlong_l1", "no_retrospective")]
# Two-sided 95% Student t quantiles by degrees of freedom.
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def run_scores(run_dir):
    """{(eval name, bucket): [item pass@1, ...]} of one run, plus an 'all' bucket."""
    scores = {}
    for items in sorted(pathlib.Path(run_dir).glob("*/items.jsonl")):
        name = items.parent.name
        for line in items.read_text().splitlines():
            item = json.loads(line)
            for bucket in (item["bucket"], "all"):
                scores.setdefault((name, bucket), []).append(item["pass_at_1"])
    return scores


def seed_of(run_dir, index):
    """The seed in a grid run's name (grid-<tag>-s<seed>-<recipe>), else the run's position."""
    match = re.search(r"-s(\d+)-", pathlib.Path(run_dir).name)
    return int(match.group(1)) if match else index


def buffers(run_dir):
    out = []
    for path in sorted(pathlib.Path(run_dir).glob("stages/*hard_buffer*.json")):
        summary = json.loads(path.read_text())
        summary = summary.get("summary", summary)
        if "carried" in summary:
            out.append(f"{pathlib.Path(run_dir).name}: carried {summary['carried']} of {summary.get('fresh', '?')} fresh tasks "
                       f"(held {summary.get('held', '?')}; pass-rate histogram {summary.get('pass_rate_histogram')})"
                       + carried_use(run_dir))
    return out


def carried_use(run_dir):
    """What the phase that took a buffer's tasks did with them: of the tasks it tried, carried
    and fresh, how many groups were all wrong, mixed (the groups dynamic sampling keeps for training)
    and all right. From the last RL phase's tasks.jsonl (which marks carried tasks) and
    reports.jsonl (each tried task's pass rate)."""
    phases = [d for d in pathlib.Path(run_dir).glob("rl-*") if (d / "tasks.jsonl").is_file() and (d / "reports.jsonl").is_file()]
    if not phases:
        return ""
    phase = max(phases, key=lambda d: int(d.name.split("-")[-1]))
    carried = {t["id"] for t in map(json.loads, (phase / "tasks.jsonl").read_text().splitlines()) if t.get("carried")}
    counts = {"carried": [0, 0, 0], "fresh": [0, 0, 0]}  # all wrong, mixed, all right
    for report in map(json.loads, (phase / "reports.jsonl").read_text().splitlines()):
        rate = report["difficulty"]["pass_rate"]
        kind = "carried" if report["record"]["id"] in carried else "fresh"
        counts[kind][0 if rate == 0 else 2 if rate == 1 else 1] += 1
    parts = [f"{kind} tried {sum(c)}: {c[0]} all wrong, {c[1]} mixed (trainable), {c[2]} all right" for kind, c in counts.items()]
    return f"; the next phase: {'; '.join(parts)}"


def cell(per_seed):
    """'mean ± seeds [± eval]' in points from each seed's item scores."""
    means = [statistics.fmean(s) for s in per_seed]
    mean = 100 * statistics.fmean(means)
    evals = [1.96 * statistics.pstdev(s) / math.sqrt(len(s)) for s in per_seed if len(s) > 1]
    eval_half = 100 * statistics.fmean(evals) if evals else float("nan")
    if len(means) >= 2:
        seeds_half = 100 * t_half(means)
        return f"{mean:.1f} ± {seeds_half:.1f} [± {eval_half:.1f}]"
    return f"{mean:.1f} [± {eval_half:.1f}]"


def t_half(values):
    """Half-width of the 95% Student-t interval of the mean of `values` (2 or more)."""
    return T95.get(len(values) - 1, 1.96) * statistics.stdev(values) / math.sqrt(len(values))


def gain_cell(by_seed, with_idea, without, bucket):
    """'mean ± t [gained/seeds]' of the per-seed pass@1 differences, in points."""
    diffs = [100 * (statistics.fmean(runs[(with_idea, bucket)]) - statistics.fmean(runs[(without, bucket)]))
             for runs in by_seed.values() if (with_idea, bucket) in runs and (without, bucket) in runs]
    if not diffs:
        return "–"
    gained = sum(d > 0 for d in diffs)
    spread = f" ± {t_half(diffs):.1f}" if len(diffs) >= 2 else ""
    return f"{statistics.fmean(diffs):+.1f}{spread} [{gained}/{len(diffs)}]"


def print_gains(by_seed, buckets):
    print("\nWhat each idea adds, paired by seed (points of pass@1): mean ± 95% interval across seeds "
          "[seeds that gained / seeds].\n")
    print("| idea | " + " | ".join(f"<={b}" if b != "all" else "all" for b in buckets) + " |")
    print("|---" * (len(buckets) + 1) + "|")
    for label, with_idea, without in GAINS:
        print(f"| {label} | " + " | ".join(gain_cell(by_seed, with_idea, without, b) for b in buckets) + " |")


def main(run_dirs):
    by_seed = {}
    notes = []
    for index, run_dir in enumerate(run_dirs):
        by_seed.setdefault(seed_of(run_dir, index), {}).update(run_scores(run_dir))
        notes.extend(buffers(run_dir))
    # {(eval name, bucket): [each seed's item scores]}
    pooled = {}
    for runs in by_seed.values():
        for key, values in runs.items():
            pooled.setdefault(key, []).append(values)
    buckets = sorted({b for (_, b) in pooled if b != "all"}) + ["all"]
    seeds = max((len(v) for v in pooled.values()), default=0)
    print(f"Held-out pass@1 (%), {seeds} seed(s): mean ± 95% interval across seeds [± per-run 95% interval "
          "from the held-out questions]; n = questions per run and length.\n")
    print("| recipe | " + " | ".join(f"<={b}" if b != "all" else "all" for b in buckets) + " |")
    print("|---" * (len(buckets) + 1) + "|")
    for name, label in ORDER:
        cells = []
        for bucket in buckets:
            per_seed = pooled.get((name, bucket))
            cells.append(f"{cell(per_seed)} (n={len(per_seed[0])})" if per_seed else "–")
        print(f"| {label} | " + " | ".join(cells) + " |")
    print_gains(by_seed, buckets)
    if notes:
        print("\nHard-sample buffers:\n")
        for note in notes:
            print(f"- {note}")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: grid_table.py RUN_DIR...")
    main(sys.argv[1:])
