#!/usr/bin/env bash
# Installs the peers umbra is measured against: restic and partclone (Debian), borg (PyPI, built
# from source against Debian's libraries) in bench/.venv-borg, fio and nbdkit (bench/protect.py), and umbra
# itself via bootstrap.sh.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "$here/../scripts/bootstrap.sh"
if [ "$(id -u)" = 0 ]; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    restic partclone zstd e2fsprogs fio nbdkit qemu-utils pkg-config libacl1-dev liblz4-dev libzstd-dev libxxhash-dev libssl-dev \
    >/dev/null
fi
if [ ! -x "$here/.venv-borg/bin/borg" ]; then
  python3 -m venv "$here/.venv-borg"
  "$here/.venv-borg/bin/pip" install -q "borgbackup==1.4.5" 2>&1 | grep -v "^WARNING: Location" || true
fi
"$here/.venv-borg/bin/borg" --version
restic version
partclone.ext4 --version 2>&1 | head -1 || true
