#!/usr/bin/env python3
"""Groups a `perf report --no-children --sort symbol` listing into the cost categories of the
README's profile table (matmul, fused kernels, layout copies, element-wise, reductions,
allocation, autodiff bookkeeping, ...) and prints a markdown table of their shares.

    perf report -i perf.data --no-children --sort symbol --stdio | python3 perf_categories.py
"""
import re
import sys

# First match wins; patterns are tried against the symbol name.
CATEGORIES = [
    ("matmul (gemm)", r"gemm"),
    # The fused kernels all run inside pulp's dispatch, under its symbols.
    ("fused CPU kernels (attention, RMSNorm, RoPE, SwiGLU, LM-head softmax)", r"pulp::|longrl_backends::cpu::"),
    ("layout copies (strided reads, transposes, memmove)",
     r"StridedIter|to_contiguous|memmove|memcpy|transpose|swap_dims|permute|SpecFromIter|try_from_fn|try_map|copy_"),
    ("exp / log (libm)", r"__expf|__logf|expf|logf|exp_nonpositive"),
    ("element-wise (unary, binary, broadcast)", r"unary_op|binary_op|scalar_op|broadcast|macerator|clamp|mask_"),
    ("reductions (sum, max, softmax)", r"reduce|sum_dim|max_dim|softmax|argmax"),
    ("fresh pages: faults and zeroing (kernel)", r"^\[k\] .*(page|fault|folio|memcg|mm_|pte|pmd|lru|zone)"),
    ("allocation (malloc, free, memset)", r"memset|malloc|free|alloc|cfree"),
    ("other kernel (thread wake-ups, scheduling)", r"^\[k\]"),
    ("autodiff bookkeeping", r"burn_autodiff"),
    ("random numbers (weight init, sampling)", r"rand|chacha"),
    ("tokenizer", r"tokenizers"),
]

LINE = re.compile(r"^\s*([0-9.]+)%\s+(\[[.k]\])\s+(.*\S)\s*$")


def categorize(marker: str, symbol: str) -> str:
    name = f"[k] {symbol}" if marker == "[k]" else symbol
    for category, pattern in CATEGORIES:
        if re.search(pattern, name):
            return category
    return "other"


def main() -> None:
    shares: dict[str, float] = {}
    for line in sys.stdin:
        match = LINE.match(line)
        if not match:
            continue
        percent, marker, symbol = float(match.group(1)), match.group(2), match.group(3)
        category = categorize(marker, symbol)
        shares[category] = shares.get(category, 0.0) + percent
    total = sum(shares.values())
    if total == 0:
        sys.exit("no samples in the perf listing")
    print("| category | share of samples |")
    print("|---|---|")
    for category, share in sorted(shares.items(), key=lambda item: -item[1]):
        print(f"| {category} | {100 * share / total:.1f}% |")


if __name__ == "__main__":
    main()
