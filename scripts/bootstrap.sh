# Sourced by demo.sh and test.sh: installs what umbra needs into .venv (and, as root, the Debian
# packages it uses), then puts .venv/bin first on PATH.  Usage: . scripts/bootstrap.sh [EXTRA]
set -euo pipefail
UMBRA_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
EXTRA=${1:-}

debian_packages=(e2fsprogs util-linux fuse3 libfuse3-dev pkg-config)
[ "$EXTRA" = test ] && debian_packages+=(fiu-utils xfsprogs btrfs-progs postgresql qemu-utils libnbd-bin nbdkit libfaketime ntfs-3g dosfstools mtools chromium chromium-driver)
missing=()
for pkg in "${debian_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "umbra: installing Debian packages: ${missing[*]}" >&2
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "umbra: please install these Debian packages: ${missing[*]}" >&2
  fi
fi

PYTHON=${PYTHON:-python3}
if [ ! -x "$UMBRA_ROOT/.venv/bin/python" ]; then
  "$PYTHON" -m venv "$UMBRA_ROOT/.venv"
fi
stamp="$UMBRA_ROOT/.venv/.installed-$EXTRA-$(sha256sum "$UMBRA_ROOT/pyproject.toml" | cut -c1-16)"
if [ ! -e "$stamp" ]; then
  spec="$UMBRA_ROOT"
  [ -n "$EXTRA" ] && spec="$UMBRA_ROOT[$EXTRA]"
  echo "umbra: installing Python packages into $UMBRA_ROOT/.venv" >&2
  # pip's own chatter about local mirrors that do not exist is noise: keep only real errors
  "$UMBRA_ROOT/.venv/bin/pip" install -q -e "$spec" 2>&1 | grep -v -e "^WARNING: Location" -e "BuildBackendWarning" -e "return '.n'.join" >&2 || true
  "$UMBRA_ROOT/.venv/bin/python" -c "import umbra.cli.main" # fails loudly if the install did not work
  touch "$stamp"
fi
export PATH="$UMBRA_ROOT/.venv/bin:$PATH"
