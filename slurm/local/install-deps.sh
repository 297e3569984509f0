#!/usr/bin/env bash
# Install what the local Slurm and the Slurm tests need, from Debian/Ubuntu apt: slurm-wlm
# (slurmctld, slurmd, the client commands), munge and shellcheck. `make test` runs it.
#
# Quiet and idempotent: prints nothing and changes nothing when everything is there. When
# something is missing and cannot be installed (no apt-get, not root and no password-less sudo),
# it fails with one clear line: the Slurm tests must not be skipped without anyone noticing.
set -euo pipefail

declare -A provides=(
    [sbatch]=slurm-wlm [srun]=slurm-wlm [scontrol]=slurm-wlm [squeue]=slurm-wlm [sinfo]=slurm-wlm
    [slurmctld]=slurm-wlm [slurmd]=slurm-wlm [munged]=munge [munge]=munge [unmunge]=munge
    [shellcheck]=shellcheck
)
declare -A missing=()
for cmd in "${!provides[@]}"; do
    if ! command -v "$cmd" >/dev/null 2>&1 && [[ ! -x "/usr/sbin/$cmd" ]]; then
        missing[${provides[$cmd]}]=1
    fi
done
(( ${#missing[@]} == 0 )) && exit 0
packages=("${!missing[@]}")

fail() { echo "slurm/local/install-deps.sh: error: $*" >&2; exit 1; }
command -v apt-get >/dev/null 2>&1 \
    || fail "${packages[*]} missing and there is no apt-get here; install Slurm (slurmctld, slurmd), munge and shellcheck by hand"
sudo=()
if (( EUID != 0 )); then
    sudo -n true 2>/dev/null || fail "${packages[*]} missing; run as root or with password-less sudo: apt-get install -y ${packages[*]}"
    sudo=(sudo -n)
fi

log=$(mktemp -t hebtron-apt.XXXXXX)
echo "installing ${packages[*]} with apt-get (log: $log)" >&2
if ! { "${sudo[@]}" apt-get update -qq \
        && "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${packages[@]}"; } >"$log" 2>&1; then
    tail -n 20 "$log" >&2
    fail "apt-get install ${packages[*]} failed (log: $log)"
fi
rm -f "$log"
