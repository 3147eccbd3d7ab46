#!/usr/bin/env bash
# Stop the single-node cluster of slurm-up.sh: cancel its jobs, then stop exactly the daemons
# slurm-up.sh started (PIDs in STATE_DIR/started.pids), newest first.
#   sudo workflow/ci/slurm-down.sh [STATE_DIR]   # default: $DYDIFF_SLURM_DIR or /tmp/dydiff-slurm
set -euo pipefail

STATE=$(realpath -m "${1:-${DYDIFF_SLURM_DIR:-/tmp/dydiff-slurm}}")
PIDS=$STATE/started.pids
[[ -f $PIDS ]] || { echo "slurm-down: nothing to stop ($PIDS missing)" >&2; exit 0; }

if scontrol ping >/dev/null 2>&1; then
  jobs=$(squeue -h -o %i 2>/dev/null || true)
  if [[ -n $jobs ]]; then
    scancel $jobs 2>/dev/null || true
    for ((i = 0; i < 40; i++)); do [[ -z $(squeue -h -o %i 2>/dev/null) ]] && break; sleep 0.25; done
  fi
fi

stop() {  # stop NAME PID: TERM, wait up to 20 s, then KILL
  local name=$1 pid=$2
  kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < 80; i++)); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.25; done
  echo "slurm-down: $name ($pid) ignored TERM, killing" >&2
  kill -KILL "$pid" 2>/dev/null || true
}

tac "$PIDS" | while read -r name pid; do
  [[ -n ${pid:-} ]] && stop "$name" "$pid"
done
rm -f "$PIDS"
for f in slurm.conf slurmdbd.conf; do   # the links slurm-up.sh made, nothing else
  [[ -L /etc/slurm/$f && $(readlink /etc/slurm/$f) == "$STATE/$f" ]] && rm -f "/etc/slurm/$f"
done
echo "slurm-down: stopped the daemons started in $STATE" >&2
