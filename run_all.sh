#!/usr/bin/env bash
# The main job: set up if needed, then run every example in examples/.
# Extra arguments go to every example (./run_all.sh --quick for a fast pass).
# Keeps going past a failing example; exits non-zero at the end if any failed.
set -u
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}

if ! "$PYTHON" -c "import torch, numpy" 2>/dev/null; then
  echo "== installing requirements.txt"
  "$PYTHON" -m pip install -r requirements.txt </dev/null || { echo "pip install failed"; exit 1; }
fi

failed=()
for script in examples/[!_]*.py; do
  echo
  echo "================================================================"
  echo "== $script $*"
  echo "================================================================"
  if ! "$PYTHON" "$script" "$@" </dev/null; then
    echo "!! $script failed"
    failed+=("$script")
  fi
done

echo
if [ ${#failed[@]} -gt 0 ]; then
  echo "== ${#failed[@]} example(s) failed: ${failed[*]}"
  exit 1
fi
echo "== all examples passed"
