"""The proxy runs as one Slurm job array, rendered from ``slurm/mix_search.sbatch.j2`` with a
cluster profile of ``slurm/`` (resources, partition, account, venv, environment).

As for ``hebtron submit``, every value substituted into the template is shell-quoted by the
template environment itself, and the ``#SBATCH`` lines are checked to be plain options.
Each array task trains one proxy (``--resume auto``) and leaves a ``TRAINED`` marker; the search
then collects the results when it is run again.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Any

import jinja2

from hebtron.launch.mix.proxies import ProxyRun
from hebtron.launch.profile import PROFILE_DIR, load_profile, venv_path
from hebtron.launch.render import check_sbatch_script

TEMPLATE = "mix_search.sbatch.j2"


def _quote(value: Any) -> str:
    if isinstance(value, bool):
        value = int(value)
    return shlex.quote(str(value))


def render_array(profile_name: str, runs: list[ProxyRun], overrides: list[str], workdir: Path,
                 job_name: str = "hebtron-mix") -> str:
    name, profile = load_profile(profile_name)
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(PROFILE_DIR)), finalize=_quote,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                             keep_trailing_newline=True, autoescape=False)
    script = env.get_template(TEMPLATE).render({
        "profile_name": name, "job_name": job_name, "last_index": len(runs) - 1,
        "gpus_per_node": profile.gpus_per_node, "cpus_per_task": profile.cpus_per_task, "mem": profile.mem,
        "partition": profile.partition, "account": profile.account, "qos": profile.qos, "time": profile.time,
        "signal_seconds": profile.signal_seconds, "sbatch_options": profile.sbatch_options,
        "workdir": str(workdir), "run_dirs": [str(r.run_dir) for r in runs], "overrides": overrides,
        "venv": venv_path(profile), "env": profile.env, "cache": profile.paths.cache,
    })
    check_sbatch_script(script)
    return script


def write_array(path: Path, script: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(script, encoding="utf-8")
    os.replace(tmp, path)
    return path
