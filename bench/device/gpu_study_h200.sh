#!/bin/bash
# On the lent GPU machine (see DEVELOPERS.md): install the carried wheels, copy the project, run one
# bench.gpu_study with the arguments given, its report written under $OUT/results as it goes.
set -u
cd "$(dirname "$0")/../.."
. bench/device/wheels.sh
rm -rf /root/proj && mkdir -p /root/proj && cp -r tunefarm bench configs /root/proj/
mkdir -p "$OUT/results"
cd /root/proj
export PYTHONPATH="$SITE:/root/proj"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
timeout "${STUDY_TIMEOUT_S:-480}" python -m bench.gpu_study --out "$OUT/results" --work-dir /root/gs-work "$@" \
    > "$OUT/results/gpu_study.log" 2>&1
echo "gpu_study exit $?"
tail -5 "$OUT/results/gpu_study.log"
