"""The one training loop and its parts: recipe, tasks, evaluation, stop rules, optimizer, checkpoints,
parallelism."""
