#!/usr/bin/env bash
# The single script for a machine with a GPU (no network needed): builds fastseg in place with the
# machine's own torch, runs the `gpu` tests and the CUDA benchmarks (same cases as `make bench`), and
# writes logs and results to $OUT (default ./gpu-results). Every step runs even if the one before
# failed; each has a `timeout`, and the whole script ends within ~8 minutes (GPU_CHECK_BUDGET_S).
#
#   bash bench/gpu_check.sh                 # or: OUT=/some/dir bash bench/gpu_check.sh
#
# Files left in $OUT (flat): summary.txt, build.log, pytest-gpu.log, pytest-gpu.xml, bench.log,
# cuda-<ops>.json, cuda-<ops>.csv, cuda-<ops>-<family>.png per op family and cuda-<ops>-summary.png (the
# figures only if matplotlib is installed). Commit the JSON under bench/results/ and add a README block
# for it (`python -m fastseg.bench report --update-readme README.md` fills it in).
set -u  # no -e: a failing step must not stop the next ones
cd "$(dirname "$0")/.." || exit 1
OUT="${OUT:-./gpu-results}"
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
START=$(date +%s)
DEADLINE=$((START + ${GPU_CHECK_BUDGET_S:-480}))

export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export MAX_JOBS="${MAX_JOBS:-16}"
export PYTHONUNBUFFERED=1
# System python without network: never reach an index, allow installing into it (PEP 668).
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_BREAK_SYSTEM_PACKAGES=1 PIP_NO_INPUT=1

# The interpreter that has torch: $PYTHON, else python, else python3.
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  for cand in python python3; do
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c "import torch" >/dev/null 2>&1; then PY="$cand"; break; fi
  done
fi
PY="${PY:-python3}"

note() { echo "$*" | tee -a "$SUMMARY"; }
elapsed() { echo $(($(date +%s) - START)); }
# limit CAP RESERVE: seconds a step may take: CAP, or less so that RESERVE seconds stay for later steps.
limit() {
  local cap=$1 reserve=$2 left
  left=$((DEADLINE - $(date +%s) - reserve))
  if [ "$left" -lt "$cap" ]; then cap=$left; fi
  echo "$cap"
}
declare -A RC

note "== fastseg gpu_check $(date -u +%FT%TZ) in $(pwd); OUT=$OUT"
note "python: $PY ($("$PY" --version 2>&1))"
"$PY" - >>"$SUMMARY" 2>&1 <<'EOF'
import importlib.metadata as md
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "gpu", torch.cuda.is_available() and torch.cuda.get_device_name())
for p in ("triton", "pytest", "matplotlib", "ninja", "setuptools", "pip"):
    try:
        print(p, md.version(p))
    except md.PackageNotFoundError:
        print(p, "MISSING")
EOF
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>&1 | head -4
  (command -v nvcc >/dev/null && nvcc --version | tail -2) || echo "nvcc not on PATH"; } >>"$SUMMARY" 2>&1

# 1. Build (in place, with this machine's torch). Fallback to build_ext --inplace only when pip failed
#    before compiling anything (e.g. a pip/setuptools problem), not after a compile error.
lim=$(limit 210 260)
note "-- build (limit ${lim}s): pip install --no-build-isolation --no-deps -e .  [TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS]"
t0=$(date +%s)
timeout -k 10 "$lim" "$PY" -m pip install --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1
RC[build]=$?
if [ "${RC[build]}" -ne 0 ] && [ $(($(date +%s) - t0)) -lt 60 ] && ! grep -q "ninja: build stopped" "$OUT/build.log"; then
  lim=$(limit 180 260)
  if [ "$lim" -gt 60 ]; then
    note "   pip failed early (rc ${RC[build]}); fallback: setup.py build_ext --inplace (limit ${lim}s)"
    echo "==== fallback: $PY setup.py build_ext --inplace" >>"$OUT/build.log"
    timeout -k 10 "$lim" "$PY" setup.py build_ext --inplace >>"$OUT/build.log" 2>&1
    RC[build]=$?
  fi
fi
note "   build rc=${RC[build]} ($(($(date +%s) - t0)) s)"
"$PY" -c "
import fastseg, fastseg.ops as o
from fastseg import _extension as e
print('   fastseg._C loaded:', e.has_ops(), '| cuda ops:', e.has_cuda_ops(), '| build:', e.build_info())
print('   load error:', e.load_error())
print('   available backends (cuda):', o.available_backends('cuda'))
" >>"$SUMMARY" 2>&1

# 2. The `gpu` tests: one pytest per test file holding any, all at once (Triton's JIT compiles are
#    CPU-bound and serial within a process; the GPU has room for a few contexts). SIGINT on timeout
#    so that pytest still writes its report and junit xml; logs and xml are merged into $OUT.
lim=$(limit 130 160)
if [ "$lim" -gt 20 ]; then
  note "-- pytest -m gpu, one process per file (limit ${lim}s)"
  t0=$(date +%s)
  PARTS=$(mktemp -d)
  declare -A PIDS
  for f in $(grep -l "pytest.mark.gpu" tests/test_*.py); do
    name=$(basename "$f" .py)
    timeout -s INT -k 15 "$lim" "$PY" -m pytest -m gpu -q -rs -p no:cacheprovider "$f" \
      --junitxml="$PARTS/$name.xml" >"$PARTS/$name.log" 2>&1 &
    PIDS[$name]=$!
  done
  RC[pytest]=0
  : >"$OUT/pytest-gpu.log"
  for name in $(printf '%s\n' "${!PIDS[@]}" | sort); do
    wait "${PIDS[$name]}"
    rc=$?
    [ "$rc" -ne 0 ] && RC[pytest]=$rc
    { echo "==== $name (rc $rc)"; cat "$PARTS/$name.log"; } >>"$OUT/pytest-gpu.log"
    note "   $name rc=$rc: $(tail -n 1 "$PARTS/$name.log")"
  done
  "$PY" - "$PARTS" "$OUT/pytest-gpu.xml" >>"$SUMMARY" 2>&1 <<'EOF'
import glob, sys, xml.etree.ElementTree as ET
merged = ET.Element("testsuites")
for path in sorted(glob.glob(sys.argv[1] + "/*.xml")):
    try:
        merged.extend(ET.parse(path).getroot().iter("testsuite"))
    except ET.ParseError as e:
        print("   unreadable junit xml:", path, e)
ET.ElementTree(merged).write(sys.argv[2], encoding="utf-8", xml_declaration=True)
EOF
  # What was skipped, and why (pytest -rs lines "SKIPPED [count] file:line: reason"), summed by reason.
  note "   skipped tests by reason:"
  cat "$PARTS"/*.log 2>/dev/null | awk '/^SKIPPED \[[0-9]+\]/ {
      n = substr($2, 2, length($2) - 2); $1 = ""; $2 = ""; $3 = ""; sub(/^ +/, ""); by[$0] += n }
    END { for (r in by) printf "     %5d  %s\n", by[r], r }' | sort -rn | head -n 20 | tee -a "$SUMMARY"
  rm -rf "$PARTS"
  note "   pytest rc=${RC[pytest]} ($(($(date +%s) - t0)) s)"
else
  RC[pytest]=skipped
  note "-- pytest skipped: out of time"
fi

# 3. The CUDA benchmarks (correctness check of every backend first). --time-limit makes the harness
#    stop starting new cases in time to write its JSON/CSV/figures; SIGTERM from timeout does the same.
lim=$(limit 240 15)
if [ "$lim" -gt 30 ]; then
  note "-- python -m fastseg.bench --device cuda --out $OUT (limit ${lim}s)"
  t0=$(date +%s)
  timeout -k 15 "$lim" "$PY" -m fastseg.bench --device cuda --out "$OUT" --time-limit $((lim - 40)) \
    >"$OUT/bench.log" 2>&1
  RC[bench]=$?
  note "   bench rc=${RC[bench]} ($(($(date +%s) - t0)) s)  (0 ok, 1 correctness failure/error, 3 stopped early, 124 killed by timeout)"
else
  RC[bench]=skipped
  note "-- bench skipped: out of time"
fi

# 4. Summary.
note "== exit codes: build=${RC[build]} pytest=${RC[pytest]} bench=${RC[bench]}; total $(elapsed) s"
note "== files in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
echo
echo "---- bench table (tail of $OUT/bench.log) ----"
tail -n 60 "$OUT/bench.log" 2>/dev/null
echo "---- pytest (files, failures and errors in $OUT/pytest-gpu.log) ----"
grep -E "^(==== |FAILED|ERROR)" "$OUT/pytest-gpu.log" 2>/dev/null | head -n 80
echo "---- summary ----"
cat "$SUMMARY"
[ "${RC[build]}" = 0 ] && [ "${RC[pytest]}" = 0 ] && [ "${RC[bench]}" = 0 ]
