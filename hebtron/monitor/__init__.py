"""Router monitors: routing figures per MoE layer and language, collapse alarms, plots, the probe."""
