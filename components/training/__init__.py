"""Training: optimizers, metrics and the epoch loop (pure torch), and the Ray Train adapter
(`components.training.worker`, `components.training.trainer`)."""

import time as _time

# When a process first imported this package: a Train worker does so when it unpickles its
# training function, so this and `worker._IMPORTED` bound what its imports cost.
IMPORT_STARTED = _time.time()
