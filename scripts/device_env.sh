#!/usr/bin/env bash
# What a prebuilt run on a lent GPU machine needs, sourced by scripts/device_check.sh and
# scripts/device_long_context.sh: unpacking a bundle where there may be no xz program, and
# finding the CUDA driver, NVRTC and the toolkit's headers where the loader and cubecl would
# not look.

# The library path as it was before cuda_libraries changed it, for programs that bring their
# own CUDA libraries (PyTorch's wheels): restore_library_path, in a subshell.
original_ld_library_path="${LD_LIBRARY_PATH-unset}"
restore_library_path() {
  if [ "$original_ld_library_path" = unset ]; then unset LD_LIBRARY_PATH; else export LD_LIBRARY_PATH="$original_ld_library_path"; fi
}

# unpack_archive ARCHIVE DIR: a .tar.xz or .tar.gz into DIR (made if missing).
unpack_archive() {
  mkdir -p "$2" || return 1
  if [[ "$1" == *.tar.xz ]] && ! command -v xz >/dev/null; then
    # No xz program (a minimal image): Python's lzma reads it.
    python3 -c 'import sys, tarfile
archive = tarfile.open(sys.argv[1], "r:xz")
try:
    archive.extractall(sys.argv[2], filter="tar")
except TypeError:  # a Python without extraction filters
    archive.extractall(sys.argv[2])' "$1" "$2"
  else
    tar xf "$1" -C "$2"
  fi
}

# On CUDA: the driver and NVRTC libraries cudarc loads at run time. It asks the loader for the
# unversioned name first (libcuda.so, libnvrtc.so), then for versioned ones down to .so.12 and
# .so.1, so a stub, a 32-bit copy or another toolkit's NVRTC under the plain name would be
# taken before the right one. The right one ends in the major version the bundle was built for
# (libcuda.so.1; libnvrtc.so.13 for CUDA 13): it is looked up as the loader would (its cache,
# LD_LIBRARY_PATH), else in the usual places (a driver mounted outside the cache, a toolkit
# outside it, PyTorch's pip wheels); where the plain name would not reach that file, a link
# under /tmp/longrl-libs makes it, and that folder and the file's own lead LD_LIBRARY_PATH.
# The summary says what was found where.

# loader_path NAME: the file the loader opens for NAME (LD_LIBRARY_PATH, then its cache's
# 64-bit entry), links resolved; nothing if none.
loader_path() {
  local dir entry
  local -a dirs=()
  IFS=: read -ra dirs <<<"${LD_LIBRARY_PATH:-}"
  for dir in "${dirs[@]}"; do
    if [ -n "$dir" ] && [ -e "$dir/$1" ]; then readlink -f "$dir/$1"; return; fi
  done
  entry="$(ldconfig -p 2>/dev/null | awk -v name="$1" '$1 == name && /x86-64/ { print $NF; exit }')"
  if [ -n "$entry" ]; then readlink -f "$entry"; fi
}

# is_64bit FILE: an ELF file of the 64-bit class (the byte after the magic number is 2).
is_64bit() {
  [ "$(od -An -tx1 -j4 -N1 "$1" 2>/dev/null | tr -d ' ')" = 02 ]
}

# library_folder NAME MAJOR DIR...: finds NAME.MAJOR, makes NAME reach it; sets library_from.
library_folder() {
  local name="$1" major="$2" plain wanted candidate
  shift 2
  plain="$(loader_path "$name")"
  wanted="$(loader_path "$name.$major")"
  if [ -z "$wanted" ] || ! is_64bit "$wanted"; then
    wanted=""
    while IFS= read -r candidate; do
      if is_64bit "$candidate"; then wanted="$(readlink -f "$candidate")"; break; fi
    done < <(find "$@" -maxdepth 9 -name "$name.$major*" 2>/dev/null | grep -v -e stubs -e compat | sort)
  fi
  if [ -z "$wanted" ]; then
    library_from="NOT FOUND${plain:+ (the plain name reaches $plain, not a .so.$major)}"
    return
  fi
  if [ "$plain" = "$wanted" ]; then library_from="$wanted (through the loader)"; return; fi
  mkdir -p /tmp/longrl-libs && ln -sf "$wanted" "/tmp/longrl-libs/$name" && ln -sf "$wanted" "/tmp/longrl-libs/$name.$major" || return 1
  export LD_LIBRARY_PATH="/tmp/longrl-libs:$(dirname "$wanted")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  library_from="$wanted (linked in /tmp/longrl-libs${plain:+; the plain name reached $plain})"
}
cuda_libraries() {
  local cuda_major=$((${CUDARC_CUDA_VERSION:-13000} / 1000))
  library_folder libcuda.so 1 /usr/local/nvidia /usr/lib /usr/lib64 /usr/local/cuda
  echo "- CUDA driver library: $library_from"
  library_folder libnvrtc.so "$cuda_major" /usr/local /opt /usr/lib
  echo "- NVRTC $cuda_major: $library_from"
  cuda_headers
}

# cubecl's NVRTC compiles kernels against the toolkit's headers, found through CUDA_PATH or
# /usr/local/cuda; elsewhere, the folder above the one holding cuda_bf16.h becomes CUDA_PATH.
cuda_headers() {
  local header
  if [ -n "${CUDA_PATH:-}" ]; then echo "- CUDA headers: $CUDA_PATH/include (CUDA_PATH)"; return; fi
  if [ -f /usr/local/cuda/include/cuda_bf16.h ]; then echo "- CUDA headers: /usr/local/cuda/include"; return; fi
  header="$(find /usr/local /opt /usr/include -maxdepth 9 -name cuda_bf16.h 2>/dev/null | sort | head -n 1)"
  if [ -z "$header" ]; then echo "- CUDA headers: NOT FOUND (no cuda_bf16.h)"; return; fi
  export CUDA_PATH="$(dirname "$(dirname "$header")")"
  echo "- CUDA headers: $CUDA_PATH/include (CUDA_PATH set)"
}

# run_report_lines LOG: what a `longrl run` log says worth keeping in a summary: the stage
# table, the total wall time, each training stage's figures, errors.
run_report_lines() {
  grep -E '^[a-z_]+#[0-9]+ |^total wall|^  (sft|rl_phase)#[0-9]+: |ERROR|^(error|Error)' "$1"
}
