#!/usr/bin/env bash
# What a prebuilt run on a lent GPU machine needs, sourced by scripts/device_check.sh and
# scripts/device_long_context.sh: unpacking a bundle where there may be no xz program, and
# finding the CUDA driver, NVRTC and the toolkit's headers where the loader and cubecl would
# not look.

# unpack_archive ARCHIVE DIR: a .tar.xz or .tar.gz into DIR (made if missing).
unpack_archive() {
  mkdir -p "$2" || return 1
  if [[ "$1" == *.tar.xz ]] && ! command -v xz >/dev/null; then
    # No xz program (a minimal image): Python's lzma reads it.
    python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1], "r:xz").extractall(sys.argv[2])' "$1" "$2"
  else
    tar xf "$1" -C "$2"
  fi
}

# On CUDA: the driver and NVRTC libraries cudarc loads at run time, by the unversioned name or
# the one ending in the major version it was built for (libcuda.so.1, libnvrtc.so.13 for
# CUDA 13); it would also take an older NVRTC (.so.12) that does not match its bindings, so
# only the wanted major counts as found. One the loader finds neither in its cache nor on
# LD_LIBRARY_PATH (a driver mounted outside the cache, a toolkit outside it, PyTorch's pip
# wheels) is looked for in the usual places, and its folder joins LD_LIBRARY_PATH; the
# summary says where each came from.
#
# library_folder NAME MAJOR DIR...: sets library_from.
library_folder() {
  local name="$1" major="$2" dir found other
  shift 2
  local pattern="^[[:space:]]*${name//./\\.}(\\.${major}[0-9.]*)? "
  if ldconfig -p 2>/dev/null | grep -qE "$pattern"; then library_from="the loader cache"; return; fi
  local -a dirs=()
  IFS=: read -ra dirs <<<"${LD_LIBRARY_PATH:-}"
  for dir in "${dirs[@]}"; do
    if compgen -G "$dir/$name" >/dev/null || compgen -G "$dir/$name.$major*" >/dev/null; then
      library_from="$dir (LD_LIBRARY_PATH)"
      return
    fi
  done
  found="$(find "$@" -maxdepth 9 \( -name "$name" -o -name "$name.$major*" \) 2>/dev/null | grep -v -e stubs -e compat | sort | head -n 1)"
  if [ -z "$found" ]; then
    other="$(find "$@" -maxdepth 9 -name "$name*" 2>/dev/null | grep -v -e stubs -e compat | sort | head -n 1)"
    library_from="NOT FOUND${other:+ (only $other, not major $major)}"
    return
  fi
  export LD_LIBRARY_PATH="$(dirname "$found")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  library_from="$(dirname "$found") (added to LD_LIBRARY_PATH)"
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

