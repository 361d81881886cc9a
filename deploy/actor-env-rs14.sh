#!/usr/bin/env bash
# The robosuite-1.4 actor environment: a second venv with robosuite 1.4.1 + mujoco 2.3.2 (what MimicGen's
# tasks are written for), the same Python and Ray as the main venv, and csil (editable, from this checkout)
# without its robosuite/mujoco pins. `csil-launch --actor-env VENV` runs env actors and the evaluator in it.
#
#   deploy/actor-env-rs14.sh [VENV]      # default: .venv-rs14 next to .venv; PYTHON=python3.11 by default
#
# Re-running with the same inputs (this script, pyproject.toml, the interpreter) does nothing: a stamp in the
# venv records them. Use the Python the main venv was made from: Ray needs the same Python and Ray versions.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv-rs14}
PYTHON=${PYTHON:-python3.11}

stamp=$(cat "$0" pyproject.toml | sha256sum | cut -c1-16)-$("$PYTHON" -c 'import sys; print(sys.version.split()[0])')
if [[ -f "$VENV/.csil-stamp" && $(cat "$VENV/.csil-stamp") == "$stamp" ]]; then
  # csil itself, editable from this checkout (a venv kept outside it may have been built from another clone)
  "$VENV/bin/pip" install -q --no-deps -e .
  echo "$VENV is up to date"; exit 0
fi
rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
requirements=$(mktemp)
trap 'rm -f "$requirements"' EXIT
# csil's own pins, except robosuite and mujoco, which are replaced by the 1.4 stack.
"$VENV/bin/python" - "$requirements" <<'PY'
import sys, tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
kept = [d for d in deps if not d.split("=")[0].split("[")[0].strip() in ("robosuite", "mujoco")]
open(sys.argv[1], "w").write("\n".join(kept + ["robosuite==1.4.1", "mujoco==2.3.2"]) + "\n")
PY
"$VENV/bin/pip" install -q -r "$requirements"
"$VENV/bin/pip" install -q --no-deps -e .
"$VENV/bin/python" -c 'import robosuite, mujoco, ray; print(f"{robosuite.__version__=} {mujoco.__version__=} {ray.__version__=}")'
echo "$stamp" > "$VENV/.csil-stamp"
