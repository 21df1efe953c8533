#!/usr/bin/env bash
# The wheelhouse that lets `make gpu-check` run on a bare GPU machine (no network; its python3
# has torch, transformers, peft, accelerate, numpy, pandas, pyarrow, grpcio, protobuf, scipy, ...).
#
#   benchmarks/gpu_wheels.sh build [DIR]    here, where pip reaches PyPI: wheels + tokenizers into DIR
#   benchmarks/gpu_wheels.sh install [DIR]  there: pip install --no-index what that python lacks
#
# DIR defaults to .gpu-wheels (git-ignored). Every version comes from constraints.txt. It carries
# what the check imports and the GPU image lacks: bitsandbytes, deepspeed (a wheel built here from
# its sdist, no ops compiled: they JIT), opacus, flwr, datasets, flwr-datasets and their small
# missing dependencies, plus the two tiny models' tokenizers (no weights). Not carried: Ray (the
# check's federation row uses the in-process grid), and flwr's SuperLink-only dependencies (uv,
# sqlalchemy, alembic, fastapi, uvicorn), which the in-process round loop never imports.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
MODE="${1:-}"
DIR="${2:-$ROOT/.gpu-wheels}"
LIMIT_MIB="${GPU_WHEELS_LIMIT_MIB:-60}"  # the device machine carries 64 MiB, the repo included

# For Python 3.12 on x86-64 Linux (the GPU machine's python3), whatever runs this script.
CARRIED=(
  bitsandbytes opacus flwr flwr-datasets datasets
  hjson pydantic pydantic-core annotated-types typing-inspection
  grpcio-health-checking cryptography cffi pycparser pycryptodome iterators tomli tomli-w
  dill multiprocess
)
TARGET=(--python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none
  --platform manylinux_2_34_x86_64 --platform manylinux_2_31_x86_64 --platform manylinux_2_28_x86_64
  --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
  --platform manylinux2014_x86_64 --platform any)

die() { echo "gpu-wheels: $*" >&2; exit 1; }

build() {
  local py="${PY:-$ROOT/.venv/bin/python}"
  [ -x "$py" ] || die "$py not found: run make install first (the build needs torch and fedprompt)"
  for p in "${CARRIED[@]}" deepspeed; do
    grep -qiE "^${p//-/[-_.]}==" "$ROOT/constraints.txt" || die "$p has no pin in constraints.txt"
  done
  rm -rf "$DIR" && mkdir -p "$DIR"
  tmp="$(mktemp -d)"  # global: the EXIT trap reads it
  trap 'rm -rf "$tmp"' EXIT
  echo "gpu-wheels: downloading ${#CARRIED[@]} wheels for Python 3.12 / x86-64 into $DIR"
  if ! "$py" -m pip download -q --no-deps --only-binary=:all: "${TARGET[@]}" -c "$ROOT/constraints.txt" -d "$DIR" "${CARRIED[@]}" 2>"$tmp/err"; then
    grep -v '^WARNING: Location' "$tmp/err" | tail -5 >&2
    die "pip download failed (above): no access to the package index here, or no wheel for Python 3.12 / x86-64; build the wheelhouse where pip reaches PyPI and copy $DIR here"
  fi
  echo "gpu-wheels: building deepspeed's wheel from its sdist (no ops compiled)"
  "$py" -m pip download -q --no-deps --no-binary=:all: -c "$ROOT/constraints.txt" -d "$tmp" deepspeed 2>"$tmp/err" || { grep -v '^WARNING: Location' "$tmp/err" | tail -5 >&2; die "pip could not download deepspeed's sdist"; }
  if ! DS_BUILD_OPS=0 "$py" -m pip wheel -q --no-deps --no-build-isolation -w "$DIR" "$tmp"/deepspeed-*.tar.gz >"$tmp/log" 2>&1; then
    tail -5 "$tmp/log" >&2
    echo "gpu-wheels: the wheel build failed; carrying the sdist (the GPU machine builds it)" >&2
    cp "$tmp"/deepspeed-*.tar.gz "$DIR"/
  fi
  "$py" "$ROOT/benchmarks/gpu_check.py" --save-tokenizers "$DIR/tokenizers"
  local size tree
  size=$(du -sb "$DIR" | cut -f1)
  tree=$(cd "$ROOT" && git ls-files -co --exclude-standard -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
  echo "gpu-wheels: $DIR holds $(ls "$DIR" | grep -c -e '\.whl$' -e '\.tar\.gz$') packages + tokenizers, $((size / 1048576)) MiB (with the working tree $(((size + tree) / 1048576)) MiB)"
  [ "$size" -le $((LIMIT_MIB * 1048576)) ] || die "$DIR is over $LIMIT_MIB MiB"
}

install() {
  local py="${PY:-python3}" missing
  [ -d "$DIR" ] || die "no wheelhouse at $DIR: run 'make gpu-wheels' where pip reaches PyPI, and carry $DIR"
  # Only what this python lacks: the GPU machine's own torch and friends stay as they are.
  missing=$("$py" - "$DIR" <<'EOF'
import re, sys
from importlib import metadata
from pathlib import Path
for f in sorted(Path(sys.argv[1]).iterdir()):
    if f.name.endswith((".whl", ".tar.gz")):
        name = re.sub(r"[-_.]+", "-", f.name.split("-")[0]).lower()
        try:
            metadata.version(name)
        except metadata.PackageNotFoundError:
            print(f)
EOF
)
  if [ -z "$missing" ]; then
    echo "gpu-wheels: nothing to install, $py has every carried package"
    return 0
  fi
  echo "gpu-wheels: installing into $py: $(echo "$missing" | xargs -n1 basename | tr '\n' ' ')"
  local args=(-m pip install -q --no-index --no-deps --no-build-isolation --find-links "$DIR")
  # The machine's own versions rule there, not this repo's pins.
  # shellcheck disable=SC2086
  PIP_CONSTRAINT='' "$py" "${args[@]}" $missing && return 0
  echo "gpu-wheels: the install failed as a whole; one package at a time" >&2
  local f status=0
  for f in $missing; do
    PIP_CONSTRAINT='' "$py" "${args[@]}" "$f" || { echo "gpu-wheels: could not install $(basename "$f")" >&2; status=1; }
  done
  return $status
}

case "$MODE" in
  build) build ;;
  install) install ;;
  *) die "usage: $0 build|install [DIR]" ;;
esac
