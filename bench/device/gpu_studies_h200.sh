#!/bin/bash
# On the lent GPU machine (see DEVELOPERS.md): one model at fp16 and fp32, tuned side by side (two
# bench.gpu_study runs, each pinned to half the cores) so that both fit one lent half hour, then timed one
# at a time on the otherwise idle GPU (--barrier). Started under setsid: it outlives the call.
#
#   bash bench/device/gpu_studies_h200.sh start MODEL  # install the carried wheels, copy the project, start
#   bash bench/device/gpu_studies_h200.sh follow S     # wait up to S seconds (or until both end), copy out
#
# The fp16 study also times the peers (PyTorch, torch.compile, TensorRT); the fp32 one only its TVM builds.
# Env: TUNE_S (tuning wall time, one deadline for both; default 660), TPT (trials per task; default 32).
set -u
cd "$(dirname "$0")/../.."
RES=/root/gs-results
case "${1:-}" in
start)
  . bench/device/wheels.sh
  rm -rf /root/proj /root/gs-barrier "$RES" && mkdir -p /root/proj "$RES" && cp -r tunefarm bench configs /root/proj/
  cd /root/proj
  export PYTHONPATH="$SITE:/root/proj"
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  deadline=$(( $(date +%s) + 90 + ${TUNE_S:-660} ))
  model=${2:-resnet18}
  half=$(( $(nproc) / 2 ))
  # precision cores extra-args
  while read -r prec cores extra; do
    name="$model-$prec"
    # shellcheck disable=SC2086  # $extra is a list of flags
    TVM_NUM_THREADS=$(( $(echo "$cores" | tr ',' '\n' | awk -F- '{n += ($2 == "" ? 1 : $2 - $1 + 1)} END {print n}') )) \
    setsid taskset -c "$cores" python -m bench.gpu_study --model "$model" --precision "$prec" \
        --trials-per-task "${TPT:-32}" --tune-until "$deadline" --barrier /root/gs-barrier --group 2 \
        --no-untuned --work-dir "/root/gs-work-$name" --out "$RES" $extra > "$RES/$name.log" 2>&1 < /dev/null &
  done <<EOF
fp16 0-$(( half - 1 )) --fold-batchnorm off
fp32 $half-$(( 2 * half - 1 )) --peers none
EOF
  sleep 5
  echo "started; tuning until $(date -d @"$deadline" +%T)"
  ls "$RES"
  ;;
follow)
  end=$(( $(date +%s) + ${2:-500} ))
  while [ "$(date +%s)" -lt "$end" ] && pgrep -f bench.gpu_study > /dev/null; do sleep 10; done
  mkdir -p "$OUT/results"
  cp "$RES"/* "$OUT/results/" 2>/dev/null
  for f in "$RES"/*.log; do echo "== $f"; tail -3 "$f"; done
  pgrep -f bench.gpu_study > /dev/null && echo "still running" || echo "all ended"
  ;;
*)
  echo "usage: $0 start MODEL | follow SECONDS" >&2
  exit 2
  ;;
esac
