"""Training infrastructure shared by both stages: checkpoints, metrics, schedules, data order."""
