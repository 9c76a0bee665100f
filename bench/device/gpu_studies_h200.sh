#!/bin/bash
# On the lent GPU machine (see DEVELOPERS.md): one model at fp16 and fp32, tuned side by side (two
# bench.gpu_study runs, each pinned to half the cores) so that both fit one lent half hour, then timed one
# at a time on the otherwise idle GPU (--barrier). Started under setsid: it outlives the call.
#
#   bash bench/device/gpu_studies_h200.sh start MODEL  # install the carried wheels, copy the project, start
#   bash bench/device/gpu_studies_h200.sh follow S     # wait up to S seconds (or until both end), copy out
#
# The fp16 study also times the peers (PyTorch, torch.compile, TensorRT); the fp32 one only its TVM builds.
#   PAIR=layouts bash bench/device/gpu_studies_h200.sh start MODEL  # fp16 in NCHW and in NHWC instead
#
# Env: TUNE_S (tuning wall time, one deadline for both; default 660), TPT (trials per task; default 32),
# PAIR (precisions: fp16 and fp32, the default; layouts: fp16 NCHW and fp16 NHWC, same seed and budget,
# the PyTorch fp16 peers timed by the NHWC study), CUDA_LIBS (1, the default: `start` also builds the cuBLAS/cuDNN
# plugins, niced, while the studies tune, and `follow` runs bench.cuda_libs on the idle GPU once both studies
# have ended and at least 120 s of its wait are left, with CUDA_LIBS_ARGS (e.g. --quick); 0: neither),
# FOLD (PAIR=layouts: on folds BatchNorm into the convs in both studies, as ONNX Runtime and the cuDNN/cuBLAS
# codegens' conv+bias+ReLU patterns want; default off),
# PLACE (e.g. cudnn,cublas: the second study, fp32 or fp16 NHWC, runs the farm's placement after tuning with
# these vendors, --placement; it builds the plugins itself before its agent starts, so `start` does not).
# What comes back: $OUT/results.tgz (every report, log and the plugins' build log) and the reports' .md files
# under $OUT/results/ (a call brings back at most 8 files).
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
  # name precision cores extra-args
  if [ "${PAIR:-precisions}" = layouts ]; then
    fold=${FOLD:-off}
    studies="fp16-nchw fp16 0-$(( half - 1 )) --fold-batchnorm $fold --layout NCHW --peers none
fp16-nhwc fp16 $half-$(( 2 * half - 1 )) --fold-batchnorm $fold --layout NHWC --peers pytorch-eager,pytorch-eager-fp16,torch-compile-ro-fp16"
  else
    studies="fp16 fp16 0-$(( half - 1 )) --fold-batchnorm off
fp32 fp32 $half-$(( 2 * half - 1 )) --peers none"
  fi
  if [ -n "${PLACE:-}" ]; then
    studies="$(echo "$studies" | sed "2s/\$/ --placement $PLACE/")"
  fi
  while read -r variant prec cores extra; do
    name="$model-$variant"
    # shellcheck disable=SC2086  # $extra is a list of flags
    TVM_NUM_THREADS=$(( $(echo "$cores" | tr ',' '\n' | awk -F- '{n += ($2 == "" ? 1 : $2 - $1 + 1)} END {print n}') )) \
    setsid taskset -c "$cores" python -m bench.gpu_study --model "$model" --precision "$prec" \
        --trials-per-task "${TPT:-32}" --tune-until "$deadline" --barrier /root/gs-barrier --group 2 \
        --no-untuned --work-dir "/root/gs-work-$name" --out "$RES" $extra > "$RES/$name.log" 2>&1 < /dev/null &
  done <<< "$studies"
  if [ "${CUDA_LIBS:-1}" = 1 ] && [ -z "${PLACE:-}" ]; then
    setsid nice -n 19 python -m bench.cuda_libs --build-only --out "$RES" > "$RES/cuda-libs-build.log" 2>&1 < /dev/null &
  fi
  sleep 5
  echo "started; tuning until $(date -d @"$deadline" +%T)"
  ls "$RES"
  ;;
follow)
  end=$(( $(date +%s) + ${2:-500} ))
  # A study is over when its log's last step says so: its process can linger minutes after (seen on the H100:
  # 4.5 min, which left the cuDNN/cuBLAS bench no time).
  studies_over() {
    ! pgrep -f "python -m bench.gpu_study" > /dev/null && return 0
    for f in "$RES"/*.log; do
      case "$f" in */cuda-libs*) continue ;; esac
      grep -qE "^- [0-9-]+ [0-9:]+ (finished|stopped by an error)" "$f" || return 1
    done
  }
  while [ "$(date +%s)" -lt "$end" ] && ! studies_over; do sleep 10; done
  left=$(( end - $(date +%s) ))
  if [ "${CUDA_LIBS:-1}" = 1 ] && studies_over && [ ! -e "$RES/cuda-libs.done" ] \
      && [ "$left" -ge 120 ]; then
    while pgrep -f "bench.cuda_libs --build-only" > /dev/null && [ "$(date +%s)" -lt $(( end - 90 )) ]; do sleep 5; done
    cd /root/proj && PYTHONPATH="/tmp/site:/root/proj" timeout $(( end - $(date +%s) )) \
        python -m bench.cuda_libs --out "$RES" ${CUDA_LIBS_ARGS:-} > "$RES/cuda-libs.log" 2>&1 < /dev/null
    echo "bench.cuda_libs exit $?" && touch "$RES/cuda-libs.done"
  fi
  mkdir -p "$OUT/results"
  tar czf "$OUT/results.tgz" -C "$RES" . 2>/dev/null
  cp "$RES"/*.md "$OUT/results/" 2>/dev/null
  for f in "$RES"/*.log; do echo "== $f"; tail -4 "$f"; done
  studies_over && echo "all ended" || echo "still running"
  ;;
*)
  echo "usage: $0 start MODEL | follow SECONDS" >&2
  exit 2
  ;;
esac
