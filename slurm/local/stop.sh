#!/usr/bin/env bash
# Stop the single-node Slurm that slurm/local/start.sh started: slurmd, slurmctld, then munged,
# each by the pid in its pid file (never by name, so another Slurm on this machine is safe).
# Idempotent: daemons that are not running are skipped. Running jobs are killed with the node.
# Keeps the state directory (logs stay readable); HEBTRON_SLURM_WIPE=1 removes it.
set -euo pipefail

STATE=${HEBTRON_SLURM_DIR:-/tmp/hebtron-slurm}

say() { printf 'slurm/local: %s\n' "$*" >&2; }

stop_pidfile() {  # stop_pidfile NAME: TERM the process, wait up to 10 s, then KILL it
    local file="$STATE/$1.pid" pid
    [[ -s "$file" ]] || return 0
    pid=$(cat "$file")
    if [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 1 100); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
            say "$1 ($pid) ignored SIGTERM; killing it"
            kill -KILL "$pid" 2>/dev/null || true
        fi
        say "stopped $1 ($pid)"
    fi
    rm -f "$file"
}

stop_pidfile slurmd
stop_pidfile slurmctld
stop_pidfile munged

if [[ "${HEBTRON_SLURM_WIPE:-0}" == 1 && -d "$STATE" ]]; then
    rm -rf -- "$STATE"
    say "removed $STATE"
fi
