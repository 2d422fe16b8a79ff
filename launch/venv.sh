# Sourced by the launch scripts: make sure .venv exists and holds this checkout's dependencies.
# Reinstalls when pyproject.toml changes (the stamp records its hash).
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$repo_root/.venv"
stamp="$venv/.mllmfl_installed"
want="$(sha256sum "$repo_root/pyproject.toml" | cut -d' ' -f1)"
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setting up $venv (first use: installs torch and the other dependencies, several minutes)" >&2
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --upgrade pip >&2 || true
  "$venv/bin/python" -m pip install --quiet -e "$repo_root[dev]" >&2
  echo "$want" > "$stamp"
fi
export PATH="$venv/bin:$PATH"
cd "$repo_root"
