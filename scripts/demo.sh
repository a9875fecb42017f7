#!/usr/bin/env bash
# The README's first command: installs umbra, then runs its main job on a local repository.
# Builds a small ext4 volume (no root needed), backs it up, changes files, backs up again,
# restores the first point and shows the difference, block ranges and files, then recovers a
# deleted file from the first point without restoring or mounting it.
# UMBRA_DEMO_DIR chooses the working directory (default: a new temporary one).
set -euo pipefail
. "$(dirname "$0")/bootstrap.sh"
export PATH="$PATH:/usr/sbin:/sbin"

work=${UMBRA_DEMO_DIR:-$(mktemp -d -t umbra-demo.XXXXXX)}
mkdir -p "$work"
cd "$work"
rm -rf repo files volume.img restored.img
export UMBRA_REPO="$work/repo"
export UMBRA_PASSWORD=${UMBRA_PASSWORD:-demo-passphrase}

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "1. build a 64 MiB ext4 volume with some files"
mkdir -p files/docs files/photos
for i in 1 2 3 4 5; do
  seq 1 20000 | sed "s/^/report $i line /" > "files/docs/report-$i.txt"
  head -c 1M /dev/urandom > "files/photos/photo-$i.jpg"
done
echo "the original notes" > files/notes.txt
truncate -s 64M volume.img
mkfs.ext4 -q -F -d files volume.img
ls -R files | head -20

step "2. create an encrypted repository and back the volume up"
umbra init
umbra backup volume.img --volume demo --tag first
first=$(umbra list --volume demo --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["id"])')

step "3. change the volume: delete a photo, edit the notes, add a file"
echo "the notes, edited after the first backup" > new-notes.txt
head -c 512K /dev/urandom > new-file.bin
debugfs -w volume.img -f - >/dev/null 2>&1 <<CMDS
rm /photos/photo-3.jpg
rm /notes.txt
write new-notes.txt /notes.txt
write new-file.bin /new-file.bin
CMDS

step "4. back up again: an incremental point stores only what changed"
umbra backup volume.img --volume demo --type incremental --tag second
umbra list

step "5. restore the first point to a new image"
umbra restore "$first" restored.img
e2fsck -fn restored.img >/dev/null 2>&1 && echo "e2fsck: the restored filesystem is clean"

step "6. the difference between the two points (changed byte ranges)"
umbra diff "$first" demo@latest | tail -5

step "7. and as files: the restored first point vs the changed volume"
listing() { debugfs -R "ls -p $2" "$1" 2>/dev/null | awk -F/ 'NF>5 && $6!="." && $6!=".." {print $6, $7}' | sort; }
for dir in / /photos; do
  diff <(listing restored.img "$dir") <(listing volume.img "$dir") | sed -n 's/^</  only in the first point:/p; s/^>/  only in the volume now: /p' || true
done
echo "  notes.txt in the first point: $(debugfs -R 'cat /notes.txt' restored.img 2>/dev/null)"
echo "  notes.txt in the volume now:  $(debugfs -R 'cat /notes.txt' volume.img 2>/dev/null)"

step "8. get the deleted photo back from the first point, without restoring or mounting anything"
umbra ls "$first" /photos
rm -rf recovered
umbra extract "$first" /photos/photo-3.jpg recovered
cmp recovered/photo-3.jpg files/photos/photo-3.jpg && echo "  recovered/photo-3.jpg is byte for byte the photo that was deleted"

step "9. verify every byte in the repository"
umbra check --read-data
printf '\ndemo files are in %s\n' "$work"
