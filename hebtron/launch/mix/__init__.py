"""``hebtron data mix-search``: a RegMix-style mixture search with small proxy runs.

- :mod:`.spec`: the search's YAML (proxy recipe, candidate sources with bounds, targets), validated;
- :mod:`.proxies`: Dirichlet-drawn mixtures, one ``hebtron train`` run each (processes, resumable);
- :mod:`.slurm_array`: the same runs as one Slurm job array, with the cluster profiles of ``slurm/``;
- :mod:`.regression`: target loss as a function of the weights, its held-out fit, its minimum;
- :mod:`.search`: the whole search, the recipe fragment and the report.

It trains, so it sits in the launch layer, above ``train`` (``hebtron.data`` may not import it).
"""
