#!/usr/bin/env bash
# Rebuilds data/kjv.txt, the character-level language model's corpus: the
# King James Version of the Bible as Debian's bible-kjv-text package ships
# it, read out through the package's `bible` program (bible-kjv), one verse
# per line, without the verse references. Nothing is downloaded at run time;
# this script is how the committed file was made.
#
#     sudo apt-get install bible-kjv-text bible-kjv   # Debian/Ubuntu
#     scripts/build_kjv_corpus.sh
#
# Licence: see data/kjv.LICENSE (public domain, except in the United
# Kingdom, where Crown copyright applies).
set -euo pipefail
cd "$(dirname "$0")/.."

command -v bible >/dev/null || {
    echo "error: no \`bible\` program: apt-get install bible-kjv-text bible-kjv" >&2
    exit 1
}
out=data/kjv.txt
# -f: one verse per line, each preceded by its reference ("Ge1:1 In the
# beginning ..."), which sed strips. -m 8: 8 MB of text buffers, enough for
# the whole text in one pass.
bible -f -m 8 "Ge1:1-Re22:21" | sed -E 's/^[1-3]?[A-Za-z]+[0-9]+:[0-9]+ //' >"$out.tmp"
lines=$(wc -l <"$out.tmp")
if [ "$lines" -ne 31102 ]; then
    echo "error: expected 31102 verses, got $lines" >&2
    rm -f "$out.tmp"
    exit 1
fi
mv "$out.tmp" "$out"
printf '%s: %s verses, %s bytes, sha256 %s\n' "$out" "$lines" "$(wc -c <"$out")" \
    "$(sha256sum "$out" | cut -d' ' -f1)"
