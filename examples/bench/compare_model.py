"""Runs `longrl bench model --json` and `transformers_bench.py --json` on the same shapes, one
after the other (never at the same time: they would share the cores), and prints longrl's
figures as ratios of transformers'. Above 1.0, longrl is faster.

    python3 examples/bench/compare_model.py --preset smollm2-135m --vocab 49152
    python3 examples/bench/compare_model.py --preset tiny --longrl target/release/longrl \\
        --python ~/bench-venv/bin/python --json

Shape options (--prompt-len, --new-tokens, --group, --train-batch, --train-seq) go to both.
Needs a longrl build (default target/release/longrl) and a Python with torch and
transformers (default: ~/bench-venv/bin/python if it exists, else python3).
"""

import argparse
import json
import os
import subprocess
import sys

KEYS = [
    ("prefill", "prefill, batch 1"),
    ("decode_batch1", "decode, batch 1"),
    ("decode_group", "decode, group sharing the prompt"),
    ("train", "forward+backward"),
]
SHAPE = ["prompt_len", "new_tokens", "group", "train_batch", "train_seq"]


def run_json(command, opening="{"):
    """Runs a benchmark and returns the JSON value (an object, or with `opening="["` a list)
    on its last line of output that starts with `opening`."""
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"error: {' '.join(command)} failed ({done.returncode}):\n{done.stderr.strip()}")
    lines = [line for line in done.stdout.splitlines() if line.strip().startswith(opening)]
    if not lines:
        sys.exit(f"error: {' '.join(command)} printed no JSON value starting with {opening}:\n{done.stdout.strip()}")
    return json.loads(lines[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--train-batch", type=int, default=4)
    parser.add_argument("--train-seq", type=int, default=256)
    parser.add_argument("--longrl", default="target/release/longrl", help="the longrl binary")
    venv = os.path.expanduser("~/bench-venv/bin/python")
    parser.add_argument("--python", default=venv if os.path.exists(venv) else "python3", help="Python with torch + transformers")
    parser.add_argument("--json", action="store_true", help="print both figures and the ratios as one JSON object")
    args = parser.parse_args()

    shape = []
    for name in SHAPE:
        shape += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    common = ["--preset", args.preset, "--vocab", str(args.vocab)] + shape
    here = os.path.dirname(os.path.abspath(__file__))
    longrl = run_json([args.longrl, "bench", "model", "--json"] + common)
    torch = run_json([args.python, os.path.join(here, "transformers_bench.py"), "--json"] + common)
    ratios = {key: longrl[key] / torch[key] for key, _ in KEYS if torch.get(key)}
    if args.json:
        print(json.dumps({"longrl": longrl, "transformers": torch, "ratios": ratios}))
        return
    print(f"preset {args.preset}, vocab {args.vocab}; longrl against transformers (torch {torch.get('torch', '?')})")
    print(f"{'figure':<36} {'longrl':>12} {'transformers':>14} {'ratio':>8}")
    for key, label in KEYS:
        print(f"{label:<36} {longrl[key]:>12.1f} {torch[key]:>14.1f} {ratios[key]:>7.2f}x")


if __name__ == "__main__":
    main()
