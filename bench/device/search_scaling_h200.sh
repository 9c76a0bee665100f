#!/bin/bash
# On the lent 16-core GPU machine's host (see DEVELOPERS.md): bench.search_scaling under setsid (it outlives
# the call), its report copied out after every follow.
#
#   bash bench/device/search_scaling_h200.sh start ARGS...  # install the carried wheels, copy the project, start
#   bash bench/device/search_scaling_h200.sh follow S       # wait up to S seconds (or until it ends), copy out
#   bash bench/device/search_scaling_h200.sh ceiling ARGS... # bench.cpu_ceiling here, its report in $OUT/results
set -u
cd "$(dirname "$0")/../.."
RES=/root/ss-results
case "${1:-}" in
start)
  shift
  . bench/device/wheels.sh
  # the machine's topology (which CPUs are one core's hardware threads), for reading the pinning
  lscpu | grep -iE '^(model name|thread|core|socket|numa)'
  echo "siblings: $(cat /sys/devices/system/cpu/cpu*/topology/thread_siblings_list | sort -u | tr '\n' ' ')"
  rm -rf /root/p2 "$RES" && mkdir -p /root/p2 "$RES" && cp -r tunefarm bench configs /root/p2/
  cd /root/p2
  export PYTHONPATH="$SITE:/root/p2"
  setsid python -m bench.search_scaling --out "$RES" "$@" > "$RES/search_scaling.log" 2>&1 < /dev/null &
  sleep 20
  tail -5 "$RES/search_scaling.log"
  ;;
follow)
  end=$(( $(date +%s) + ${2:-500} ))
  while [ "$(date +%s)" -lt "$end" ] && pgrep -f bench.search_scaling > /dev/null; do sleep 10; done
  mkdir -p "$OUT/results"
  cp "$RES"/* "$OUT/results/" 2>/dev/null
  # each row's events, the farm's logs (the search workers', the agents') and the candidates whose builds timed
  # out (the host's and the workers' FarmBuilders keep them), and MetaSchedule's own per-task logs of the host and
  # of every share (timestamped: when each batch's search began and went to the builder and the runner), for
  # reading a slow row
  tar czf "$OUT/results/work.tgz" -C /tmp --exclude='*.so' --exclude='*.tar' --exclude='*.npz' \
      $(cd /tmp && ls -d search-scaling-*/logs/*/progress.jsonl search-scaling-*/farm/*.log \
        search-scaling-*/logs/*/logs/build-timeouts tunefarm-search-*/build-timeouts \
        search-scaling-*/logs/*/logs/*.log tunefarm-search-*/logs/*.log 2>/dev/null) 2>/dev/null
  tail -5 "$RES/search_scaling.log"
  pgrep -f bench.search_scaling > /dev/null && echo "still running" || echo "ended"
  ;;
ceiling)
  shift
  . bench/device/wheels.sh
  mkdir -p "$OUT/results"
  PYTHONPATH="$SITE:$PWD" python -m bench.cpu_ceiling --out "$OUT/results" "$@" | tail -12
  ;;
*)
  echo "usage: $0 start ARGS... | follow SECONDS | ceiling ARGS..." >&2
  exit 2
  ;;
esac
