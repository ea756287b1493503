#!/usr/bin/env python3
"""Paired comparison of two evaluations of the same held-out questions.

Reads two `evaluate` outputs (`items.jsonl` in a run directory: one line per question with its
`id`, length `bucket` and `pass_at_1`) and prints, per length bucket and over all, the pass@1
of each, the gain with its 95% interval from the per-question differences (normal
approximation), and how many questions rose or fell. Questions present in only one file are
left out and counted.

    python3 scripts/paired_gain.py runs/real-s1/before/items.jsonl runs/real-s1/after/items.jsonl
    python3 scripts/paired_gain.py BEFORE AFTER --json    # one JSON object per bucket

Standard library only.
"""

import argparse
import json
import math
import sys


def read_items(path):
    """{question id: (bucket, pass@1)} of an evaluation's items.jsonl, naming bad lines."""
    items = {}
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                items[item["id"]] = (item["bucket"], float(item["pass_at_1"]))
            except (ValueError, KeyError, TypeError) as error:
                sys.exit(f"error: {path}:{number}: not an evaluation item ({error})")
    return items


def summarize(label, pairs):
    """Pass@1 before and after, the mean paired gain and its 95% half-width, rises and falls."""
    n = len(pairs)
    differences = [after - before for before, after in pairs]
    mean = sum(differences) / n
    variance = sum((d - mean) ** 2 for d in differences) / (n - 1) if n > 1 else 0.0
    return {
        "bucket": label,
        "questions": n,
        "before": 100.0 * sum(b for b, _ in pairs) / n,
        "after": 100.0 * sum(a for _, a in pairs) / n,
        "gain": 100.0 * mean,
        "gain_95": 100.0 * 1.96 * math.sqrt(variance / n),
        "rose": sum(d > 0 for d in differences),
        "fell": sum(d < 0 for d in differences),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("before", help="items.jsonl of the first evaluation")
    parser.add_argument("after", help="items.jsonl of the second evaluation")
    parser.add_argument("--json", action="store_true", help="one JSON object per bucket")
    args = parser.parse_args()
    before, after = read_items(args.before), read_items(args.after)
    shared = sorted(set(before) & set(after))
    if not shared:
        sys.exit(f"error: {args.before} and {args.after} share no question id")
    buckets = {}
    for question in shared:
        buckets.setdefault(before[question][0], []).append((before[question][1], after[question][1]))
    rows = [summarize(bucket, pairs) for bucket, pairs in sorted(buckets.items())]
    if len(rows) > 1:
        rows.append(summarize("all", [pair for pairs in buckets.values() for pair in pairs]))
    unmatched = len(set(before) ^ set(after))
    if args.json:
        for row in rows:
            print(json.dumps(row | {"unmatched": unmatched}))
        return
    print("| bucket | questions | before | after | gain (95%) | rose / fell |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['bucket']} | {r['questions']} | {r['before']:.1f}% | {r['after']:.1f}% "
            f"| {r['gain']:+.1f} (+-{r['gain_95']:.1f}) | {r['rose']} / {r['fell']} |"
        )
    if unmatched:
        print(f"(left out: {unmatched} question ids found in only one of the files)")


if __name__ == "__main__":
    main()
