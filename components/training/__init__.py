"""Training: optimizers, metrics and the epoch loop (pure torch), and the Ray Train adapter
(`components.training.worker`, `components.training.trainer`)."""
