#!/usr/bin/env bash
# A real single-node SLURM cluster on loopback, for the SLURM integration test (tests/test_slurm.py)
# and for trying the `slurm` profile on a Debian machine without a cluster.
#
#   sudo workflow/ci/slurm-up.sh [STATE_DIR]     # default: $DYDIFF_SLURM_DIR or /tmp/dydiff-slurm
#   sudo workflow/ci/slurm-down.sh [STATE_DIR]   # stops exactly the daemons this script started
#
# Needs root on Debian/Ubuntu. Installs (apt-get, only what is missing) slurm-wlm, munge, slurmdbd
# and mariadb-server, then starts, without systemd: munged (unless one already answers), MariaDB
# (127.0.0.1 only), slurmdbd, slurmctld and slurmd. Accounting through slurmdbd because the
# Snakemake SLURM executor polls job states with `sacct` (snakemake_executor_plugin_slurm,
# job_status_query.py); without accounting, sacct fails and `squeue` forgets finished jobs after
# MinJobAge. Every file lives under STATE_DIR; the PIDs of the daemons started here are appended
# to STATE_DIR/started.pids for slurm-down.sh. The configs are linked from /etc/slurm/, the default
# place every SLURM command reads: SLURM_CONF is no way to point at them, because the executor's
# job step (snakemake-executor-plugin-slurm-jobstep 0.6) removes every SLURM_* variable before
# its nested `srun`. An existing /etc/slurm/slurm.conf that is not such a link is left alone
# (exit 2): this machine belongs to a real cluster.
# Exit codes: 0 up, 2 not possible here (not root / not Debian), 3 packages not installable
# (no apt registry), 1 a daemon did not come up (its log is printed).
set -euo pipefail

STATE=$(realpath -m "${1:-${DYDIFF_SLURM_DIR:-/tmp/dydiff-slurm}}")
DB_PORT=${DYDIFF_SLURM_DB_PORT:-3307}
PACKAGES=(slurm-wlm munge slurmdbd mariadb-server)

say() { echo "slurm-up: $*" >&2; }
fail() { say "$2"; exit "$1"; }

[[ $(id -u) == 0 ]] || fail 2 "needs root (it installs packages and starts daemons)"
command -v apt-get >/dev/null && [[ -f /etc/debian_version ]] || fail 2 "needs Debian/Ubuntu (apt-get)"
if [[ -e $STATE/started.pids ]]; then
  fail 2 "$STATE/started.pids exists: a cluster is already up there (slurm-down.sh $STATE first)"
fi
for f in slurm.conf slurmdbd.conf; do
  if [[ -e /etc/slurm/$f && ! -L /etc/slurm/$f ]]; then
    fail 2 "/etc/slurm/$f exists and is not a link from slurm-up.sh: not touching a real cluster"
  fi
done
if [[ -L /etc/slurm/slurm.conf && -e $(dirname "$(readlink /etc/slurm/slurm.conf)")/started.pids ]]; then
  fail 2 "a test cluster is already up ($(readlink /etc/slurm/slurm.conf)); slurm-down.sh it first"
fi

# --- packages -----------------------------------------------------------------------------------
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  say "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null 2>&1 \
         && apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null; } \
    || fail 3 "apt-get could not install ${missing[*]} (no package registry reachable?)"
fi

mkdir -p "$STATE"/{ctld,slurmd,mysql,log}
: > "$STATE/started.pids"
record() { echo "$1 $2" >> "$STATE/started.pids"; }   # name pid

wait_for() {  # wait_for SECONDS LOGFILE DESCRIPTION COMMAND...: poll until COMMAND succeeds
  local limit=$1 logfile=$2 what=$3; shift 3
  for ((i = 0; i < limit * 4; i++)); do
    "$@" >/dev/null 2>&1 && return 0
    sleep 0.25
  done
  say "$what did not come up within ${limit}s; last lines of $logfile:"
  tail -n 30 "$logfile" >&2 || true
  exit 1
}

start() {  # start NAME PIDFILE LOGFILE COMMAND...: start a daemon detached from this script's
           # output (a caller reading it would wait forever), record the PID from its pid file
  local name=$1 pidfile=$2 logfile=$3; shift 3
  rm -f "$pidfile"
  "$@" </dev/null >>"$STATE/log/$name.out" 2>&1 &
  for ((i = 0; i < 80; i++)); do
    [[ -s $pidfile ]] && { record "$name" "$(cat "$pidfile")"; return 0; }
    sleep 0.25
  done
  say "$name wrote no pid file $pidfile within 20 s; last lines of its logs:"
  tail -n 30 "$STATE/log/$name.out" "$logfile" >&2 || true
  exit 1
}

# --- munge: authentication between the daemons and the clients ----------------------------------
if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  say "munged already running: using it (not stopped by slurm-down.sh)"
else
  install -d -o munge -g munge -m 0755 /run/munge
  install -d -o munge -g munge -m 0700 /var/log/munge /var/lib/munge
  [[ -s /etc/munge/munge.key ]] || { mungekey --create --force && chown munge:munge /etc/munge/munge.key; }
  # munged checks that its files belong to the munge user: keep its log in /var/log/munge.
  start munged /run/munge/munged.pid /var/log/munge/munged.log \
    runuser -u munge -- munged --pid-file=/run/munge/munged.pid --log-file=/var/log/munge/munged.log
  wait_for 20 /var/log/munge/munged.log munged bash -c 'munge -n | unmunge'
fi

# --- MariaDB for slurmdbd, TCP on 127.0.0.1 only ------------------------------------------------
chown -R mysql:mysql "$STATE/mysql"
mariadb-install-db --user=mysql --datadir="$STATE/mysql" --skip-test-db \
  --auth-root-authentication-method=socket >"$STATE/log/mariadb-install.log" 2>&1
start mariadbd "$STATE/mysql/mariadb.pid" "$STATE/mysql/mariadb.log" \
  runuser -u mysql -- mariadbd --datadir="$STATE/mysql" --socket="$STATE/mysql/mysql.sock" \
  --pid-file="$STATE/mysql/mariadb.pid" --bind-address=127.0.0.1 --port="$DB_PORT" \
  --log-error="$STATE/mysql/mariadb.log" --skip-name-resolve
wait_for 60 "$STATE/mysql/mariadb.log" MariaDB mariadb --socket="$STATE/mysql/mysql.sock" -e "SELECT 1"
mariadb --socket="$STATE/mysql/mysql.sock" <<'SQL'
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
SQL

# --- slurm.conf and slurmdbd.conf ---------------------------------------------------------------
HOST=$(hostname -s)
# CPUs, sockets, cores and memory of this machine as slurmd sees them; keep 1 GiB for the OS.
HW=$(slurmd -C | head -n 1 | sed -E 's/^NodeName=[^ ]+ //; s/ ?UpTime=.*//')
MEM=$(sed -E 's/.*RealMemory=([0-9]+).*/\1/' <<<"$HW")
HW=$(sed -E "s/RealMemory=[0-9]+/RealMemory=$((MEM > 2048 ? MEM - 1024 : MEM))/" <<<"$HW")

cat > "$STATE/slurm.conf" <<EOF
# Written by workflow/ci/slurm-up.sh: one node ($HOST), loopback only, accounting via slurmdbd.
ClusterName=dydiff
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/slurmd
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
# No cgroups (containers, CI machines): track processes by their parent, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
# Finished jobs stay visible to squeue for 10 minutes (sacct keeps them for good).
MinJobAge=600
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
# sacct shows --comment, where the executor names each job's rule and wildcards.
AccountingStoreFlags=job_comment
JobCompType=jobcomp/none
NodeName=$HOST NodeAddr=127.0.0.1 $HW State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF

cat > "$STATE/slurmdbd.conf" <<EOF
# Written by workflow/ci/slurm-up.sh
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
SlurmUser=root
PidFile=$STATE/slurmdbd.pid
LogFile=$STATE/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
EOF
chmod 600 "$STATE/slurmdbd.conf"   # slurmdbd refuses a config others can read
mkdir -p /etc/slurm
ln -sfn "$STATE/slurm.conf" /etc/slurm/slurm.conf
ln -sfn "$STATE/slurmdbd.conf" /etc/slurm/slurmdbd.conf

# --- the daemons --------------------------------------------------------------------------------
start slurmdbd "$STATE/slurmdbd.pid" "$STATE/log/slurmdbd.log" slurmdbd
wait_for 60 "$STATE/log/slurmdbd.log" slurmdbd sacctmgr -n list cluster
sacctmgr -i add cluster dydiff >/dev/null 2>&1 || true   # already there on a reused database

start slurmctld "$STATE/slurmctld.pid" "$STATE/log/slurmctld.log" slurmctld
wait_for 60 "$STATE/log/slurmctld.log" slurmctld scontrol ping

start slurmd "$STATE/slurmd.pid" "$STATE/log/slurmd.log" slurmd
node_idle() { [[ $(sinfo -h -N -n "$HOST" -o %t) == idle ]]; }
wait_for 60 "$STATE/log/slurmd.log" "node $HOST (idle in sinfo)" node_idle

say "up: partition $(sinfo -h -o '%P, %D node %t, %c CPUs, %m MB')"
