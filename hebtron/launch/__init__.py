"""Slurm submission: cluster profiles, sbatch rendering, auto-resume and chained evaluation.

- :mod:`.profile`: ``slurm/<name>.yaml`` cluster profiles, validated with one-line errors;
- :mod:`.render`: sbatch scripts from ``slurm/*.sbatch.j2``, every value shell-quoted;
- :mod:`.submit`: ``hebtron submit`` (job directory, resolved recipe, ``sbatch --parsable``,
  the evaluation job ``--dependency=afterok`` on training);
- :mod:`.jobs`: ``hebtron jobs``; :mod:`.verdict`: the evaluation job's verdict record;
- :mod:`.slurm`: the Slurm client commands.
"""
