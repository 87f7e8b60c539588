#!/usr/bin/env bash
# Rebuilds data/go/definitions.txt: the Gene Ontology term definitions, one per line, from
# Debian's r-bioc-go.db package (file GO.sqlite, table go_term), ordered by GO id.
# Needs apt-get (Debian) and python3; downloads ~12 MB.
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION=3.16.0-1
SHA256=6cf9c43b97212811ecb7ad0d7cde12e76f984ab7494a59c02455239a9dd3243d
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

(cd "$work" && apt-get download "r-bioc-go.db=$VERSION")
deb="$work/r-bioc-go.db_${VERSION}_all.deb"
echo "$SHA256  $deb" | sha256sum --check --quiet
dpkg-deb -x "$deb" "$work/root"
sqlite="$work/root/usr/lib/R/site-library/GO.db/extdata/GO.sqlite"

python3 - "$sqlite" data/go/definitions.txt <<'PY'
import sqlite3, sys
db, out = sys.argv[1], sys.argv[2]
rows = sqlite3.connect(db).execute(
    "SELECT definition FROM go_term WHERE definition IS NOT NULL ORDER BY go_id"
)
n = 0
with open(out, "w", encoding="utf-8", newline="\n") as f:
    for (definition,) in rows:
        line = " ".join(definition.split())  # one definition per line, whitespace collapsed
        if line:
            f.write(line + "\n")
            n += 1
print(f"{out}: {n} definitions")
PY
