#!/usr/bin/env bash
# Idempotent set-up for torpor on Debian 12 as root: system packages, CRIU 4.2.1, Ceph, the venv.
# Fast the second time: every step checks before it acts.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=${TORPOR_VENV:-$ROOT/.venv}
PY=${PYTHON:-python3}
WITH_CEPH=${TORPOR_WITH_CEPH:-1}

"$ROOT/scripts/install-criu.sh"
if [ "$WITH_CEPH" = 1 ]; then "$ROOT/scripts/install-ceph.sh"; fi

# CRIU's lazy-pages page server wants big pipes (see CRIU notes); harmless when it fails.
if [ "$(id -u)" = 0 ] && [ "$(cat /proc/sys/fs/pipe-max-size)" -lt 4194304 ]; then
  sysctl -q -w fs.pipe-max-size=4194304 || true
fi

stamp="$VENV/.torpor-installed"
# Reinstall when the packaging or the launchers change (setup.py compiles bin/torpor.c).
want=$(cat "$ROOT/pyproject.toml" "$ROOT/setup.py" "$ROOT"/bin/* | sha256sum | cut -d' ' -f1)
if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating venv $VENV" >&2
  "$PY" -m venv "$VENV"
fi
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "setup: installing torpor and its dependencies into $VENV" >&2
  # pip warns about every index location this machine lacks: keep only real messages.
  "$VENV/bin/pip" install -q -e "$ROOT[dev]" 2> >(grep -v '^WARNING: Location' >&2)
  echo "$want" > "$stamp"
fi
# Byte-compile the (editable) package now: with PYTHONDONTWRITEBYTECODE set, as on these
# machines, every command would otherwise recompile torpor's modules (~40 ms per command).
"$VENV/bin/python" -m compileall -q "$ROOT/src" >/dev/null
# pyenv's Python has no `rados` module and PyPI has none: link Debian's ABI-compatible build.
rados_so=/usr/lib/python3/dist-packages/rados.cpython-311-x86_64-linux-gnu.so
site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
if [ -f "$rados_so" ] && [ ! -e "$site/$(basename "$rados_so")" ]; then
  ln -s "$rados_so" "$site/"
fi
