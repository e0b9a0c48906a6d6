#!/bin/bash
# Seed the fuzz corpora (fuzz/corpus/<target>/) from real repositories:
# makes two small unencrypted repositories and one encrypted one with the
# ekko binary, backs up a small disk image of random, text and zero data,
# and cuts their files into seeds (make_seeds.py).
#
# usage: fuzz/seeds.sh [path/to/ekko]   (default: target/release/ekko)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
ekko=${1:-$here/../target/release/ekko}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export EKKO_PASSWORD=x EKKO_CACHE_DIR=$work/cache

head -c 3M /dev/urandom >"$work/disk.img"
# (yes ends on SIGPIPE, which pipefail would count as a failure)
yes "ekko fuzz seed text line with some words 0123456789" | head -c 3M >>"$work/disk.img" || true
head -c 2M /dev/zero >>"$work/disk.img"
"$ekko" init --repo "$work/repo" --encryption none >/dev/null
"$ekko" backup --repo "$work/repo" --vm v --disk d="$work/disk.img" >/dev/null
printf changed | dd of="$work/disk.img" bs=1 seek=5000000 conv=notrunc 2>/dev/null
"$ekko" backup --repo "$work/repo" --vm v --disk d="$work/disk.img" >/dev/null
snap=$(ls "$work/repo/snapshots" | head -1)
"$ekko" protect --repo "$work/repo" "$snap" >/dev/null

# Small chunks of text: a pack small enough to be a seed whole.
python3 - "$work/small.img" <<'EOF'
import sys
out = b''
for i in range(6):
    out += (('chunk %d: ' % i + 'ekko small seed text %d ' % (i * 7)) * 3300).encode()[:65536]
out += b'\0' * 65536 + b'tail text'
open(sys.argv[1], 'wb').write(out)
EOF
"$ekko" init --repo "$work/repo-small" --encryption none --chunk-size 65536 >/dev/null
"$ekko" backup --repo "$work/repo-small" --vm v --disk d="$work/small.img" >/dev/null

"$ekko" init --repo "$work/repo-enc" >/dev/null

python3 "$here/make_seeds.py" "$here/corpus" "$work/repo" "$work/repo-small" "$work/repo-enc"
