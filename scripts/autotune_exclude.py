#!/usr/bin/env python3
"""Rewrites a cubecl autotune cache so that it never picks a kernel known to be wrong.

cubecl (0.10) times the candidate kernels of each operation shape once and stores, per
shape key, every candidate's timing and the index of the fastest in
`<cache>/<version>/<device>/<operation>.json.log` (one JSON object per line). On load it
reads only the key, its checksum and `fastest_index`. This script sets `fastest_index`,
wherever the excluded kernel was chosen, to the fastest other candidate that ran. With
`--trim` it also keeps only the chosen candidate's timing (the seed committed for CI).

Why: on Mesa's llvmpipe, cubecl's `matmul_double_unit_max_tile_size` gives wrong products
for some shapes with a transposed left operand (the weight-gradient layout autodiff uses),
e.g. 70 x 600 by 600 x 48 in the attention test; see README, "Devices and precision".

    scripts/autotune_exclude.py engine/target/autotune [--kernel NAME] [--trim]
"""

import argparse
import json
import pathlib
import sys

FAULTY = "matmul_double_unit_max_tile_size"


def nanos(result):
    mean = result["computation"]["mean"]
    return mean["secs"] * 1_000_000_000 + mean["nanos"]


def rewrite_entry(entry, kernel, trim):
    """Returns the entry with `kernel` never chosen, and whether its choice changed."""
    value = entry["value"]
    ran = [r["outcome"]["Ok"] for r in value["results"] if "Ok" in r["outcome"]]
    chosen = next((r for r in ran if r["index"] == value["fastest_index"]), None)
    changed = False
    if chosen is not None and chosen["name"] == kernel:
        others = sorted((r for r in ran if r["name"] != kernel), key=nanos)
        if not others:
            raise SystemExit(f"no other candidate ran for {json.dumps(entry['key'])}: cannot exclude {kernel}")
        chosen, changed = others[0], True
        value["fastest_index"] = chosen["index"]
    if trim and chosen is not None:
        value["results"] = [{"outcome": {"Ok": chosen}}]
    return entry, changed


def rewrite_file(path, kernel, trim):
    entries, changed = [], 0
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as err:
            raise SystemExit(f"{path}:{number}: not a JSON cache entry ({err})")
        entry, was_changed = rewrite_entry(entry, kernel, trim)
        entries.append(json.dumps(entry, separators=(",", ":")))
        changed += was_changed
    temporary = path.with_suffix(path.suffix + ".tmp")
    temporary.write_text("".join(e + "\n" for e in entries))
    temporary.replace(path)
    return changed


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cache", type=pathlib.Path, help="the autotune folder, e.g. engine/target/autotune")
    parser.add_argument("--kernel", default=FAULTY, help=f"the kernel never to choose (default {FAULTY})")
    parser.add_argument("--trim", action="store_true", help="keep only the chosen candidate's timing")
    args = parser.parse_args()
    if not args.cache.is_dir():
        print(f"{args.cache}: no autotune cache there (nothing to rewrite)", file=sys.stderr)
        return
    for path in sorted(args.cache.rglob("*.json.log")):
        changed = rewrite_file(path, args.kernel, args.trim)
        if changed:
            print(f"{path}: {changed} choice(s) of {args.kernel} replaced", file=sys.stderr)


if __name__ == "__main__":
    main()
