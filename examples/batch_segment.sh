#!/usr/bin/env bash
# Pick in every tomogram of a folder with `cryosam batch`: clicks made once on one tomogram
# become a saved query, which then runs over the whole folder (resumable: run it again after
# a crash or a time limit and finished tomograms are skipped). Usage:
#   bash examples/batch_segment.sh TOMO_DIR CLICKED_TOMO CLICKS [extra cryosam options]
# The extra options go to both `cryosam query` and `cryosam batch`; options only batch takes
# (--no-ray, --workers N, --shard i/n, --ray-address) go in BATCH_OPTS, e.g.
#   BATCH_OPTS="--workers 2" bash examples/batch_segment.sh ...
set -euo pipefail
dir="${1:?usage: batch_segment.sh TOMO_DIR CLICKED_TOMO CLICKS [options]}"
tomo="${2:?the tomogram the clicks were made on}"
clicks="${3:?the clicks file (CSV x,y,z voxels, STAR, or IMOD model2point)}"
shift 3
query="$dir/particle.cryosam-query"
# made once (saving it again takes the time of a run; the same clicks and parameters give
# the same query, which the batch resumes with); delete the file to use new clicks
if [ ! -f "$query" ]; then
  cryosam query "$tomo" --points "$clicks" --out "$query" "$@"
fi
# shellcheck disable=SC2086  # BATCH_OPTS holds several words on purpose
cryosam batch "$dir" --out "$dir/picks" --query "$query" "$@" ${BATCH_OPTS:-}
column -s, -t < "$dir/picks/batch.csv"
