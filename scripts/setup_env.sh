# Sourced by the entry scripts: creates .venv with jaxspeech and its dependencies, then activates it.
# Override the interpreter with PYTHON=python3.12.
VENV="${JAXSPEECH_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  "${PYTHON:-python3}" -m venv "$VENV"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
if ! python -c "import jaxspeech, pytest, tensorflow" 2>/dev/null || [ pyproject.toml -nt "$VENV/.installed" ]; then
  python -m pip install -q --upgrade pip
  python -m pip install -q -e ".[build,test]"
  touch "$VENV/.installed"
fi
