#!/usr/bin/env bash
# A single-node SLURM on this machine for the SLURM tests (tests/test_slurm.py) and for trying the sweeps'
# `--launcher submitit` against a real scheduler: munged, MariaDB, slurmdbd (submitit reads job states with
# sacct, which needs accounting), slurmctld and slurmd, from Debian's packages, one partition `debug` holding
# this machine's CPUs and no GPUs. Idempotent: installs only what is missing, writes the configuration only
# when it differs, starts only the daemons that are not running (restarting SLURM's when its configuration
# changed), and waits until a job can be submitted. Prints the time it took.
#
# Exit codes: 0 ready; 3 cannot install or start it here (not root, no apt-get), with one line on stderr saying
# why; 1 a daemon failed to start (its log is named).
# Needs root: SLURM's daemons and the packages are system-wide. Logs: /var/log/slurm/.
set -euo pipefail
started=$EPOCHREALTIME
say() { echo "start_slurm: $*"; }
cannot() { echo "start_slurm: $*" >&2; exit 3; }
elapsed() { awk -v from="$started" -v to="$EPOCHREALTIME" 'BEGIN { printf "%.1f", to - from }'; }

CLUSTER=clipadapt
PARTITION=debug
# slurm-wlm's daemons and clients without its optional plugins (HDF5, InfluxDB, IPMI, ...): half the download.
PACKAGES=(slurmctld slurmd slurmdbd slurm-client munge mariadb-server)
BINARIES=(sbatch sacct slurmctld slurmd slurmdbd munged mariadbd)

missing=()
for binary in "${BINARIES[@]}"; do
  command -v "$binary" >/dev/null 2>&1 || [ -x "/usr/sbin/$binary" ] || missing+=("$binary")
done
if [ ${#missing[@]} -gt 0 ]; then
  [ "$(id -u)" -eq 0 ] || cannot "SLURM is not installed (${missing[*]} missing) and installing it needs root"
  command -v apt-get >/dev/null 2>&1 || cannot "SLURM is not installed (${missing[*]} missing) and there is no apt-get to install it"
  say "installing ${PACKAGES[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # A clean machine may have no package lists yet: update once if the first try fails.
  if ! apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >/tmp/start_slurm_apt.log 2>&1; then
    apt-get update -qq >>/tmp/start_slurm_apt.log 2>&1 && apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >>/tmp/start_slurm_apt.log 2>&1 ||
      cannot "apt-get could not install ${PACKAGES[*]}: see /tmp/start_slurm_apt.log"
  fi
  say "installed in $(elapsed) s"
fi
[ "$(id -u)" -eq 0 ] || {
  # Installed but not root: usable only if someone else runs it.
  if sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mix|alloc)'; then say "already running"; exit 0; fi
  cannot "SLURM is installed but not running, and starting its daemons needs root"
}
export PATH="$PATH:/usr/sbin:/sbin"
# One start at a time (parallel test workers may each ask for the cluster).
# (The daemons it starts must not inherit the lock: 9>&- closes it for them.)
exec 9>/run/start_slurm.lock
flock -w 600 9 || cannot "another tools/start_slurm.sh has held /run/start_slurm.lock for 10 minutes"

host=$(hostname -s)
# The CPUs slurmd itself finds (nproc would follow OMP_NUM_THREADS, and the configuration with it).
cpus=$(slurmd -C | sed -n 's/.*CPUs=\([0-9]*\).*/\1/p')
# A job of several tasks meets at its first node's host name (MASTER_ADDR): it must resolve.
if ! getent hosts "$host" >/dev/null; then
  echo "127.0.0.1 $host" >>/etc/hosts
  say "added $host to /etc/hosts (it resolved nowhere)"
fi
memory_mb=$(( $(awk '/^MemTotal:/ {print $2}' /proc/meminfo) / 1024 * 9 / 10 ))   # a tenth left to the system

# The node's address is 127.0.0.1 whatever the host name resolves to (a CI machine's may resolve nowhere).
slurm_conf="# Written by tools/start_slurm.sh: a single-node test cluster.
ClusterName=$CLUSTER
SlurmctldHost=$host(127.0.0.1)
SlurmUser=slurm
AuthType=auth/munge
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
# A job that no node of its partition can ever hold is refused at sbatch, not left pending forever.
EnforcePartLimits=ALL
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
# Ended jobs leave squeue after 30 s (sacct keeps them); a killed job's processes get 10 s after SIGTERM.
MinJobAge=30
KillWait=10
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$memory_mb State=UNKNOWN
PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"
# MariaDB's slurm user logs in through its Unix socket as the OS user slurm: no password anywhere.
slurmdbd_conf="# Written by tools/start_slurm.sh.
AuthType=auth/munge
DbdHost=localhost
SlurmUser=slurm
PidFile=/run/slurmdbd.pid
LogFile=/var/log/slurm/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StorageLoc=slurm_acct_db
"

changed=0
write_if_changed() {   # write_if_changed PATH MODE CONTENT
  if ! printf '%s' "$3" | cmp -s - "$1"; then
    printf '%s' "$3" >"$1"
    changed=1
  fi
  chmod "$2" "$1"
  chown slurm:slurm "$1"
}
mkdir -p /etc/slurm /var/log/slurm /var/lib/slurm/slurmctld /var/lib/slurm/slurmd
chown slurm:slurm /var/log/slurm /var/lib/slurm/slurmctld /var/lib/slurm/slurmd
write_if_changed /etc/slurm/slurm.conf 644 "$slurm_conf"
write_if_changed /etc/slurm/slurmdbd.conf 600 "$slurmdbd_conf"

running() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
stop() {   # stop PIDFILE: the daemon of that pid file, and only it
  if running "$1"; then
    kill "$(cat "$1")"
    for _ in $(seq 50); do running "$1" || break; sleep 0.2; done
  fi
}
wait_for() {   # wait_for SECONDS WHAT LOG COMMAND...
  local seconds=$1 what=$2 log=$3; shift 3
  for _ in $(seq $((seconds * 5))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
  echo "start_slurm: $what did not come up within $seconds s: see $log" >&2
  exit 1
}

if [ "$changed" -eq 1 ]; then   # a new configuration: SLURM's daemons start again with it
  stop /run/slurmd.pid; stop /run/slurmctld.pid; stop /run/slurmdbd.pid
fi

mkdir -p /run/munge && chown munge:munge /run/munge
[ -f /etc/munge/munge.key ] || { /usr/sbin/mungekey --create >/dev/null 2>&1 || /usr/sbin/create-munge-key -f; }
if ! running /run/munge/munged.pid; then
  runuser -u munge -- /usr/sbin/munged 9>&-
fi
wait_for 10 munged /var/log/munge/munged.log bash -c 'munge -n | unmunge'

if ! mysqladmin ping >/dev/null 2>&1; then
  mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld
  (setsid mysqld_safe >/dev/null 2>&1 9>&- &)
fi
wait_for 60 MariaDB /var/log/mysql/error.log mysqladmin ping
mariadb -e "CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED VIA unix_socket;
            GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';"

running /run/slurmdbd.pid || slurmdbd 9>&-
wait_for 30 slurmdbd /var/log/slurm/slurmdbd.log sacctmgr -n list cluster
sacctmgr -n list cluster format=cluster | grep -qw "$CLUSTER" || sacctmgr -i add cluster "$CLUSTER" >/dev/null
running /run/slurmctld.pid || slurmctld 9>&-
wait_for 30 slurmctld /var/log/slurm/slurmctld.log scontrol ping
running /run/slurmd.pid || slurmd 9>&-
node_up() { sinfo -h -n "$host" -o %T | grep -qE '^(idle|mix|alloc)'; }
# A node that went down (a killed slurmd, a changed configuration) comes back when told to.
for _ in $(seq 10); do node_up && break; sleep 1; done
node_up || scontrol update nodename="$host" state=resume 2>/dev/null || true
wait_for 30 "slurmd (node $host)" /var/log/slurm/slurmd.log node_up
wait_for 30 "sacct (accounting)" /var/log/slurm/slurmdbd.log sacct -n -X -S now
say "SLURM ready in $(elapsed) s: cluster $CLUSTER, partition $PARTITION, node $host with $cpus CPUs, no GPUs"
