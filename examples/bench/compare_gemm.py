"""Runs `longrl bench gemm --json`, then the same [m, k] x [k, n] products through torch's
matmul (its sgemm, output allocation included as in longrl), one after the other on the same
machine, and prints GFLOP/s side by side with longrl's as a ratio of torch's (above 1.0,
longrl is faster), and each as a share of the best rate torch reached on any shape.

    ~/bench-venv/bin/python examples/bench/compare_gemm.py
    ~/bench-venv/bin/python examples/bench/compare_gemm.py --seconds 2 --json

Needs a longrl build (default target/release/longrl) and torch in this Python.
"""

import argparse
import json
import time

from compare_model import run_json


def longrl_figures(binary, seconds):
    return run_json([binary, "bench", "gemm", "--json", "--seconds", str(seconds)], opening="[")


def torch_gflops(m, k, n, seconds):
    """The best of several timed batches of products, as longrl measures."""
    import torch

    torch.manual_seed(0)
    a, b = torch.rand(m, k), torch.rand(k, n)
    torch.matmul(a, b)  # warm-up
    best, started = float("inf"), time.perf_counter()
    while time.perf_counter() - started < seconds:
        batch_started, count = time.perf_counter(), 0
        while count == 0 or time.perf_counter() - batch_started < seconds / 10:
            torch.matmul(a, b)
            count += 1
        best = min(best, (time.perf_counter() - batch_started) / count)
    return 2.0 * m * k * n / best / 1e9


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--longrl", default="target/release/longrl")
    parser.add_argument("--seconds", type=float, default=1.0, help="seconds per shape and tool")
    parser.add_argument("--json", action="store_true", help="one JSON object per shape")
    args = parser.parse_args()

    import torch

    ours = longrl_figures(args.longrl, args.seconds)
    rows = []
    for figure in ours:
        theirs = torch_gflops(figure["m"], figure["k"], figure["n"], args.seconds)
        rows.append({**figure, "longrl_gflops": figure["gflops"], "torch_gflops": theirs, "ratio": figure["gflops"] / theirs})
    peak = max(row["torch_gflops"] for row in rows)
    for row in rows:
        row["longrl_share_of_torch_peak"] = row["longrl_gflops"] / peak
        row["torch_share_of_torch_peak"] = row["torch_gflops"] / peak
    if args.json:
        for row in rows:
            print(json.dumps({key: value for key, value in row.items() if key not in ("gflops", "runs")}))
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; torch's best rate: {peak:.1f} GFLOP/s")
    print(f"{'':32} {'m':>6} {'k':>6} {'n':>6} {'longrl':>8} {'torch':>8} {'ratio':>6} {'of peak':>14}")
    for row in rows:
        shares = f"{row['longrl_share_of_torch_peak']:.0%} / {row['torch_share_of_torch_peak']:.0%}"
        print(
            f"{row['name']:32} {row['m']:>6} {row['k']:>6} {row['n']:>6} {row['longrl_gflops']:>8.1f} "
            f"{row['torch_gflops']:>8.1f} {row['ratio']:>5.2f}x {shares:>14}"
        )


if __name__ == "__main__":
    main()
