#!/usr/bin/env bash
# A one-node Slurm on this machine, for trying and testing the job templates.
#
#   jobs/slurm/local-cluster.sh up       # start munged, slurmctld and slurmd; wait for an idle node
#   source "$MPIOPT_SLURM_DIR/env"       # SLURM_CONF for sbatch, squeue, scontrol, ...
#   jobs/slurm/local-cluster.sh status   # "up" (exit 0) or "down" (exit 3), with the daemons' PIDs
#   jobs/slurm/local-cluster.sh down     # cancel every job, stop exactly the daemons `up` started
#
# Needs Debian's packages (as root: `apt-get install --no-install-recommends slurmctld slurmd
# slurm-client munge`) and root, as slurmd does. Everything lives under one directory,
# $MPIOPT_SLURM_DIR (default /tmp/mpiopt-slurm): configuration, state, spool, logs, the munge
# key and socket, and the PID files. `down` keeps it, so a later `up` recovers the job ID
# counter; a new directory starts job IDs from the clock (10 IDs per second, wrapping after
# 69 days), so IDs are not reused across resets: a killed MPI step leaves a shared-memory
# segment named after its job ID that a later step with the same ID would open.
#
# Settings (environment): MPIOPT_SLURM_DIR; MPIOPT_SLURM_CPUS (CPUs the node advertises,
# default 8 per core: tests oversubscribe); MPIOPT_SLURM_GPUS (stand-in GPUs, empty files, that
# the node advertises so that GPU scripts pass `sbatch --test-only`; default 4, nothing runs on
# them); MPIOPT_SLURM_AUTH (munge, the default, or none: no munged, tests only);
# MPIOPT_SLURM_PORT (slurmctld's port, slurmd takes the next; default: the first free pair
# from a port derived from the directory's name, below the ephemeral range).
set -euo pipefail

DIR=${MPIOPT_SLURM_DIR:-/tmp/mpiopt-slurm}
CONF=$DIR/etc/slurm.conf
RUN=$DIR/run
AUTH=${MPIOPT_SLURM_AUTH:-munge}
NODE=$(hostname -s)

die() { echo "local-cluster: $*" >&2; exit 1; }

# ---- processes we started: "PID STARTTIME" in $RUN/NAME.pid ---------------------------------

start_time() { # the start time of live PID in clock ticks (/proc/PID/stat field 22), or nothing
    local stat fields
    read -r stat 2>/dev/null <"/proc/$1/stat" || return 0
    read -r -a fields <<<"${stat##*) }"  # the fields after "(comm) ": a comm may hold spaces
    # A dead process can stay a zombie for a while where PID 1 is slow to reap (containers).
    case ${fields[0]} in Z | X) return 0 ;; esac
    echo "${fields[19]}"
}

alive() { # NAME: is the process recorded for NAME still the one we started?
    local file=$RUN/$1.pid pid started
    [ -f "$file" ] || return 1
    read -r pid started <"$file" || return 1
    [ -n "$pid" ] && [ "$(start_time "$pid")" = "$started" ]
}

pid_of() { local pid _; read -r pid _ <"$RUN/$1.pid"; echo "$pid"; }

spawn() { # NAME CMD...: start CMD detached in its own session; record its PID and start time
    local name=$1; shift
    # A background job of a script is no process group leader, so setsid does not fork: $! is
    # the daemon itself.
    setsid "$@" >>"$DIR/log/$name.out" 2>&1 </dev/null &
    local pid=$!
    echo "$pid $(start_time "$pid")" >"$RUN/$name.pid"
}

stop() { # NAME...: stop the recorded processes together, TERM then KILL after 5 s
    local name left
    for name in "$@"; do alive "$name" && kill -TERM "$(pid_of "$name")" 2>/dev/null; done
    for _ in $(seq 50); do
        left=()
        for name in "$@"; do alive "$name" && left+=("$name"); done
        [ ${#left[@]} -eq 0 ] && break
        sleep 0.1
    done
    for name in "$@"; do
        alive "$name" && kill -KILL "$(pid_of "$name")" 2>/dev/null
        rm -f "$RUN/$name.pid"
    done
    return 0
}

stepds() { # PIDs of slurmstepd processes with a file open under $DIR (ours, not another Slurm's)
    local pid
    for pid in $(pgrep -x slurmstepd); do
        if ls -l "/proc/$pid/fd" 2>/dev/null | grep -q -- "-> $DIR/"; then echo "$pid"; fi
    done
}

# ---- shared memory that killed MPI steps left ------------------------------------------------

fnv1a() { # REPLY=the 32-bit FNV-1a hash of $1, in hex, as MPICH names shared memory
    local text=$1 hash=2166136261 i byte
    for ((i = 0; i < ${#text}; i++)); do
        printf -v byte '%d' "'${text:i:1}"
        hash=$(( ((hash ^ byte) * 16777619) & 0xffffffff ))
    done
    printf -v REPLY '%x' "$hash"
}

remove_stale_shm() { # segments of our jobs' steps 0-7 that no process maps any more
    # MPICH under PMI-2 names a step's segment mpich_shm_<FNV-1a of "job.step">_<node>; a
    # killed step (scancel, a failing rank, a time limit) leaves it, 2-4 MB each.
    [ -f "$DIR/log/jobcomp.txt" ] || return 0
    local present job step name stale=()
    present=" $(cd /dev/shm && echo mpich_shm_* mpich_vci_*) "
    for job in $(sed -n 's/^JobId=\([0-9]*\) .*/\1/p' "$DIR/log/jobcomp.txt" | sort -u); do
        for ((step = 0; step < 8; step++)); do
            fnv1a "$job.$step"
            for name in "mpich_shm_${REPLY}_0" "mpich_vci_${REPLY}_0"; do
                [[ $present == *" $name "* ]] && stale+=("$name")
            done
        done
    done
    for name in "${stale[@]}"; do
        grep -qs "/dev/shm/$name" /proc/[0-9]*/maps || rm -f "/dev/shm/$name"
    done
}

# ---- configuration ----------------------------------------------------------------------------

listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

default_port() { # the first free pair from a port below the ephemeral range, stable for $DIR
    local port=$(( 20000 + $(cksum <<<"$DIR" | cut -d' ' -f1) % 5000 * 2 ))
    while listening "$port" || listening $((port + 1)); do port=$((port + 2)); done
    echo "$port"
}

first_job_id() { echo $(( $(date +%s) % 6000000 * 10 + 1 )); }

write_conf() {
    local port=${MPIOPT_SLURM_PORT:-$(default_port)}
    local cpus=${MPIOPT_SLURM_CPUS:-$(( 8 * $(nproc) ))} gpus=${MPIOPT_SLURM_GPUS:-4}
    local auth="AuthType=auth/none" cred="CredType=cred/none" info="AuthInfo=cred_expire=5"
    if [ "$AUTH" = munge ]; then
        auth="AuthType=auth/munge" cred="CredType=cred/munge"
        info="AuthInfo=socket=$RUN/munge.socket,cred_expire=5"
    fi
    local gres="" gpu_node=""
    if [ "$gpus" -gt 0 ]; then gres="GresTypes=gpu" gpu_node="Gres=gpu:$gpus"; fi
    # The first start fixes FirstJobId; later starts keep it (and the recovered counter wins).
    local first; first=$(sed -n 's/^FirstJobId=//p' "$CONF" 2>/dev/null || true)
    [ -n "$first" ] && [ -d "$DIR/state" ] && [ -n "$(ls -A "$DIR/state")" ] ||
        first=$(first_job_id)
    cat >"$CONF" <<EOF
# Written by jobs/slurm/local-cluster.sh: a one-node cluster for tests; see that script.
ClusterName=mpiopt
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$port
SlurmdPort=$((port + 1))
SlurmUser=root
SlurmdUser=root
$auth
$cred
$info
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$RUN/slurmctld.daemon.pid
SlurmdPidFile=$RUN/slurmd.daemon.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
PlugStackConfig=$DIR/etc/plugstack.conf
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=pmi2
SlurmdParameters=config_overrides
SchedulerParameters=batch_sched_delay=0,sched_interval=1,bf_interval=1
EnforcePartLimits=ALL
ReturnToService=2
MinJobAge=3600
KillWait=5
KillOnBadExit=1
FirstJobId=$first
MaxJobId=67043328
MailProg=/bin/true
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/log/jobcomp.txt
$gres
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus $gpu_node State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
PartitionName=gpu Nodes=$NODE MaxTime=INFINITE State=UP
EOF
    : >"$DIR/etc/plugstack.conf"
    if [ "$gpus" -gt 0 ]; then
        # Stand-in device files: slurmd counts GPUs by their files (count-only ones it drops).
        mkdir -p "$DIR/dev"
        for ((i = 0; i < gpus; i++)); do : >"$DIR/dev/gpu$i"; done
        echo "NodeName=$NODE Name=gpu File=$DIR/dev/gpu[0-$((gpus - 1))]" >"$DIR/etc/gres.conf"
    else
        : >"$DIR/etc/gres.conf"
    fi
    printf 'export SLURM_CONF=%q\n' "$CONF" >"$DIR/env"
}

check_dirs() { # munged refuses a socket below a directory that others cannot search
    local d=$DIR
    while [ "$d" != / ] && [ -n "$d" ]; do
        [ -e "$d" ] && [ -z "$(find "$d" -maxdepth 0 -perm -o+x)" ] &&
            die "$d is not searchable by others (o+x): munged refuses its socket below it;" \
                "chmod o+x it, use another MPIOPT_SLURM_DIR or MPIOPT_SLURM_AUTH=none"
        d=$(dirname "$d")
    done
    return 0
}

# ---- commands ---------------------------------------------------------------------------------

need() {
    local missing=() c
    for c in slurmctld slurmd sbatch scontrol squeue scancel; do
        command -v "$c" >/dev/null || missing+=("$c")
    done
    [ "$AUTH" != munge ] || command -v munged >/dev/null || missing+=(munged)
    [ ${#missing[@]} -eq 0 ] || die "not installed: ${missing[*]} (as root: apt-get install" \
        "--no-install-recommends slurmctld slurmd slurm-client munge)"
    [ "$(id -u)" -eq 0 ] || die "slurmd must run as root"
}

is_up() { alive slurmctld && alive slurmd && { [ "$AUTH" != munge ] || alive munged; }; }

wait_idle() { # SINCE: wait up to 30 s for our slurmd (started at SINCE) to register, idle
    local since=$1 node="" state="" start="" deadline=$((SECONDS + 30))
    while [ $SECONDS -lt $deadline ]; do
        # Recovered state shows the node idle before slurmd registers: check its start time.
        node=$(SLURM_CONF=$CONF scontrol -o show node "$NODE" 2>/dev/null) || node=""
        state=$(sed -n 's/.* State=\([^ ]*\) .*/\1/p' <<<"$node")
        start=$(sed -n 's/.* SlurmdStartTime=\([^ ]*\) .*/\1/p' <<<"$node")
        case $state in
            IDLE | MIXED | ALLOCATED) [[ ! $start < $since ]] && return 0 ;;
            *INVAL* | *DRAIN* | *FAIL*) break ;;
        esac
        is_up || break
        sleep 0.1
    done
    tail -n 5 "$DIR"/log/*.log "$DIR"/log/*.out >&2 || true
    echo "local-cluster: the node did not become idle (state '${state:-none}'); logs are in" \
        "$DIR/log; stopping" >&2
    return 1
}

start_munged() {
    mkdir -p "$DIR/munge"
    chmod 0700 "$DIR/munge"
    [ -f "$DIR/munge/munge.key" ] || mungekey -c -k "$DIR/munge/munge.key" 2>/dev/null ||
        { dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
          chmod 0600 "$DIR/munge/munge.key"; }
    spawn munged munged -F --force --key-file="$DIR/munge/munge.key" \
        --socket="$RUN/munge.socket" --pid-file="$RUN/munged.daemon.pid" \
        --seed-file="$DIR/munge/munged.seed" --log-file="$DIR/log/munged.log"
    for _ in $(seq 50); do [ -S "$RUN/munge.socket" ] && return 0; sleep 0.1; done
    die "munged did not start; see $DIR/log/munged.log"
}

cmd_up() {
    need
    if is_up; then echo "local-cluster: already up ($DIR)"; return 0; fi
    cmd_down >/dev/null  # whatever is left of a half-started cluster
    mkdir -p "$DIR"/{etc,state,spool,log,run}
    chmod 0755 "$DIR" "$DIR/run"
    [ "$AUTH" != munge ] || check_dirs
    write_conf
    [ "$AUTH" != munge ] || start_munged
    SLURM_CONF=$CONF spawn slurmctld slurmctld -D -i -f "$CONF"
    local since; since=$(date +%Y-%m-%dT%H:%M:%S)
    SLURM_CONF=$CONF spawn slurmd slurmd -D -N "$NODE" -f "$CONF"
    wait_idle "$since" || { cmd_down >&2; exit 1; }
    echo "local-cluster: up ($DIR); export SLURM_CONF=$CONF"
}

cmd_down() {
    if alive slurmctld; then
        local jobs
        jobs=$(SLURM_CONF=$CONF squeue -h -o %A 2>/dev/null | sort -u) || true
        if [ -n "$jobs" ]; then
            # shellcheck disable=SC2086
            SLURM_CONF=$CONF scancel $jobs 2>/dev/null || true
            for _ in $(seq 100); do  # KillWait is 5 s
                [ -z "$(SLURM_CONF=$CONF squeue -h -t R,CG,S -o %A 2>/dev/null)" ] && break
                sleep 0.1
            done
        fi
    fi
    local was_up=no name
    for name in slurmd slurmctld munged; do alive "$name" && was_up=yes; done
    stop slurmd slurmctld munged
    local pid
    for pid in $(stepds); do kill -KILL "$pid" 2>/dev/null || true; done
    remove_stale_shm
    echo "local-cluster: down ($DIR$([ $was_up = yes ] || echo ', was not running'))"
}

cmd_status() {
    local name out=()
    for name in munged slurmctld slurmd; do
        if alive "$name"; then out+=("$name=$(pid_of "$name")"); fi
    done
    if is_up; then
        echo "up ($DIR) ${out[*]}"
    else
        echo "down ($DIR)${out:+ left: ${out[*]}}"
        return 3
    fi
}

case ${1:-} in
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    *) echo "usage: $0 up|down|status (directory: \$MPIOPT_SLURM_DIR, default" \
            "/tmp/mpiopt-slurm)" >&2
       exit 2 ;;
esac
