#!/usr/bin/env bash
# Segment every tomogram in a folder with the same clicks file per tomogram, sharing one
# feature cache, then list the pick counts. Usage:
#   bash examples/batch_segment.sh TOMO_DIR [extra cryosam segment options]
# Each tomogram NAME.mrc needs its clicks in NAME.csv (x,y,z voxels) beside it.
set -euo pipefail
dir="${1:?usage: batch_segment.sh TOMO_DIR [options]}"; shift || true
cache="$dir/.cryosam_cache"
for tomo in "$dir"/*.mrc; do
  name="$(basename "$tomo" .mrc)"
  clicks="$dir/$name.csv"
  [ -f "$clicks" ] || { echo "skip $name: no $clicks" >&2; continue; }
  cryosam segment "$tomo" --points "$clicks" --tomo-name "$name" \
    --cache-dir "$cache" --out "$dir/${name}_cryosam" --overwrite --quiet "$@"
  echo "$name: $(($(wc -l < "$dir/${name}_cryosam/picks.csv") - 1)) picks"
done
