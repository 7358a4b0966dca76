"""visiontune building blocks: data, augmentation, models, training, tuning, evaluation,
registry, tracking."""
