#!/usr/bin/env bash
# Configure, build and test the libtorch C++ build of fastseg (CMakeLists.txt) with ctest.
#
#   bash cpp_tests/run.sh            (after `make venv` / `make build` created .venv with torch)
#
# Environment:
#   PYTHON             interpreter whose torch to build against (default: .venv/bin/python)
#   BUILD_DIR          CMake build folder (default: build-cmake)
#   FASTSEG_WITH_CUDA  ON/OFF: also compile csrc/ops/cuda/*.cu (default: OFF)
#   MAX_JOBS           parallel compile jobs (default: 2)
#   CUDA_HOME          toolkit root; default: what `nvcc --dryrun` prints as TOP= (nvcc on PATH
#                      may be a wrapper script outside the toolkit)
#   TORCH_CUDA_ARCH_LIST  CUDA archs when FASTSEG_WITH_CUDA=ON (CMakeLists default: 8.0;9.0+PTX)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
case "$PYTHON" in /*) ;; */*) PYTHON="$PWD/$PYTHON" ;; esac  # relative to the caller's folder
cd "$ROOT"
BUILD_DIR="${BUILD_DIR:-build-cmake}"
WITH_CUDA="${FASTSEG_WITH_CUDA:-OFF}"
JOBS="${MAX_JOBS:-2}"

die() { echo "cpp_tests/run.sh: $*" >&2; exit 1; }
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

case "$WITH_CUDA" in
  1|ON|on|On|TRUE|true|YES|yes) WITH_CUDA=ON ;;
  0|OFF|off|Off|FALSE|false|NO|no|"") WITH_CUDA=OFF ;;
  *) die "FASTSEG_WITH_CUDA must be ON or OFF, got '$WITH_CUDA'" ;;
esac

# ---- torch: CMake prefix, CUDA version, the pip wheel's libnvrtc -------------------------------
command -v "$PYTHON" >/dev/null 2>&1 || [ -x "$PYTHON" ] \
  || die "no Python at '$PYTHON'; run \`make venv\` first or set PYTHON=/path/to/python"
TORCH_INFO="$("$PYTHON" - <<'EOF'
import glob, os
import torch
site = os.path.dirname(os.path.dirname(os.path.abspath(torch.__file__)))
nvrtc = sorted(p for p in glob.glob(os.path.join(site, "nvidia", "*", "lib", "libnvrtc.so.*"))
               if os.path.basename(p).count(".") == 2)  # libnvrtc.so.N, not .so.N.M / builtins
print(torch.utils.cmake_prefix_path)
print(torch.version.cuda or "")
print(nvrtc[0] if nvrtc else "")
print(torch.__version__)
EOF
)" || die "'$PYTHON' cannot import torch; run \`make venv\` first"
{ read -r TORCH_PREFIX; read -r TORCH_CUDA; read -r NVRTC; read -r TORCH_VERSION; } <<<"$TORCH_INFO"
TORCH_DIR="$TORCH_PREFIX/Torch"
[ -f "$TORCH_DIR/TorchConfig.cmake" ] || die "no TorchConfig.cmake under $TORCH_DIR"

CMAKE_ARGS=(-DCMAKE_BUILD_TYPE=Release "-DTorch_DIR=$TORCH_DIR" "-DFASTSEG_WITH_CUDA=$WITH_CUDA")

# ---- CUDA toolkit (a CUDA build of torch needs one for find_package(Torch), even CPU-only) ------
if [ -n "$TORCH_CUDA" ]; then
  CUDA_ROOT=""
  for var in CUDA_HOME CUDA_PATH; do
    root="${!var:-}"
    if [ -z "$CUDA_ROOT" ] && [ -n "$root" ] && [ -x "$root/bin/nvcc" ]; then CUDA_ROOT="$root"; fi
  done
  if [ -z "$CUDA_ROOT" ] && command -v nvcc >/dev/null 2>&1; then
    CUDA_ROOT="$(nvcc --dryrun -c -x cu /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -n1)"
    [ -n "$CUDA_ROOT" ] || CUDA_ROOT="$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")"
  fi
  [ -n "$CUDA_ROOT" ] || die "torch $TORCH_VERSION is a CUDA $TORCH_CUDA build and its CMake config \
needs a CUDA toolkit: install one or set CUDA_HOME"
  CUDA_ROOT="$(readlink -f "$CUDA_ROOT")"
  [ -x "$CUDA_ROOT/bin/nvcc" ] || die "no bin/nvcc under the CUDA root $CUDA_ROOT"
  CMAKE_ARGS+=("-DCUDA_TOOLKIT_ROOT_DIR=$CUDA_ROOT" "-DCMAKE_CUDA_COMPILER=$CUDA_ROOT/bin/nvcc")
  if [ -n "$NVRTC" ]; then
    CMAKE_ARGS+=("-DCUDA_nvrtc_LIBRARY=$NVRTC")
  else
    echo "cpp_tests/run.sh: warning: no libnvrtc.so.N in the nvidia wheels next to torch" >&2
  fi
elif [ "$WITH_CUDA" = ON ]; then
  die "FASTSEG_WITH_CUDA=ON but torch $TORCH_VERSION has no CUDA"
fi

# ---- tools: cmake >= 3.18 and ninja (system or the venv's) --------------------------------------
VENV_BIN="$(dirname "$PYTHON")"
CMAKE="$(command -v cmake || true)"
[ -n "$CMAKE" ] || { [ -x "$VENV_BIN/cmake" ] && CMAKE="$VENV_BIN/cmake"; } \
  || die "cmake not found; install it (apt-get install cmake, or $PYTHON -m pip install cmake)"
CTEST="$(dirname "$CMAKE")/ctest"
[ -x "$CTEST" ] || CTEST="$(command -v ctest)"
cmake_ver="$("$CMAKE" --version | sed -n '1s/.* \([0-9][0-9.]*\).*/\1/p')"
[ "$(printf '%s\n3.18\n' "$cmake_ver" | sort -V | head -n1)" = 3.18 ] \
  || die "cmake $cmake_ver is too old (need >= 3.18)"
NINJA="$(command -v ninja || true)"
[ -n "$NINJA" ] || { [ -x "$VENV_BIN/ninja" ] && NINJA="$VENV_BIN/ninja"; } || true
if [ -n "$NINJA" ]; then
  GENERATOR=Ninja
  CMAKE_ARGS+=("-DCMAKE_MAKE_PROGRAM=$NINJA")
else
  GENERATOR="Unix Makefiles"
  echo "cpp_tests/run.sh: warning: ninja not found, using $GENERATOR" >&2
fi
# A build folder configured with another generator cannot be reused: drop its cache only.
if [ -f "$BUILD_DIR/CMakeCache.txt" ] \
   && ! grep -qx "CMAKE_GENERATOR:INTERNAL=$GENERATOR" "$BUILD_DIR/CMakeCache.txt"; then
  echo "cpp_tests/run.sh: $BUILD_DIR was configured with another generator; reconfiguring" >&2
  rm -rf "$BUILD_DIR/CMakeCache.txt" "$BUILD_DIR/CMakeFiles"
fi

echo "== fastseg C++: torch $TORCH_VERSION (CUDA ${TORCH_CUDA:-none}), CUDA kernels $WITH_CUDA, \
$GENERATOR, $JOBS jobs, $BUILD_DIR"
t0="$(now)"
"$CMAKE" -S . -B "$BUILD_DIR" -G "$GENERATOR" "${CMAKE_ARGS[@]}"
t_cfg="$(elapsed "$t0")"

t0="$(now)"
"$CMAKE" --build "$BUILD_DIR" -j "$JOBS"
t_build="$(elapsed "$t0")"

t0="$(now)"
status=0
(cd "$BUILD_DIR" && "$CTEST" --output-on-failure) || status=$?
t_test="$(elapsed "$t0")"

echo "== fastseg C++: configure ${t_cfg}s, build ${t_build}s, test ${t_test}s"
exit "$status"
