# Sourced by scripts/run and scripts/test: a project-local virtualenv with the
# pinned versions from requirements/constraints.txt.
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  for candidate in python3.11 python3; do
    if command -v "$candidate" >/dev/null 2>&1; then PY="$candidate"; break; fi
  done
fi
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=".venv/.installed-$(cat pyproject.toml requirements/constraints.txt | sha256sum | cut -c1-16)${EXTRAS:-}"
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install -q --disable-pip-version-check -c requirements/constraints.txt -e ".${EXTRAS:-}"
  rm -f .venv/.installed-*
  touch "$stamp"
fi
