"""A trial's CPU, memory (and GPU) use over time, as MLflow system metrics (`system/...`).

The numbers come from MLflow's own collectors (`mlflow.system_metrics`: CPU and memory of the
node, disk, network; GPU through pynvml where it is installed), plus two of the training
process itself (`system/process_cpu_percentage`: 100 is one core busy;
`system/process_rss_megabytes`), which tell a starved trial from a wasteful one. They are
written through the `Tracker`, so a tracking outage journals them like any other metric;
MLflow's own monitor thread instead stops for good at the first failed call.

The sampler measures its own cost: the CPU time of its thread, logged at the end as
`system/sampler_cpu_seconds` (docs/performance.md compares it with the trial's time).
"""

from __future__ import annotations

import threading
import time

PREFIX = "system/"


def _collectors() -> list:
    """MLflow's collectors that work on this machine (GPU only where NVML answers)."""
    from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor
    from mlflow.system_metrics.metrics.disk_monitor import DiskMonitor
    from mlflow.system_metrics.metrics.network_monitor import NetworkMonitor

    found = [CPUMonitor(), DiskMonitor(), NetworkMonitor()]
    try:
        from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor

        found.append(GPUMonitor())
    except Exception:   # no pynvml or no NVIDIA driver: no GPU collector, as in MLflow
        pass
    return found


class SystemSampler:
    """Samples every `every_s` seconds in a daemon thread and logs each sample at once (step
    0, 1, ...; `start_step` continues a restarted run's series). `stop()` logs a last sample,
    so even a run shorter than `every_s` has one."""

    def __init__(self, tracker, run_id: str, every_s: float, start_step: int = 0):
        import psutil

        self.tracker, self.run_id, self.every_s = tracker, run_id, every_s
        self.step = start_step
        self.process = psutil.Process()
        self.collectors = _collectors()
        self.cpu_s = 0.0          # this sampler's own CPU time
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="visiontune-sys")
        self._lock = threading.Lock()

    def start(self) -> SystemSampler:
        import psutil

        psutil.cpu_percent()              # the first reading of a counter is meaningless:
        self.process.cpu_percent()        # take it now, so the first sample measures a span
        self._thread.start()
        return self

    def sample(self) -> dict[str, float]:
        """One reading of every collector and of this process, as `system/...` metrics."""
        metrics: dict[str, float] = {}
        for c in self.collectors:
            c.collect_metrics()
            metrics.update(c.aggregate_metrics())
            c.clear_metrics()
        metrics["process_cpu_percentage"] = round(self.process.cpu_percent(), 1)
        metrics["process_rss_megabytes"] = round(self.process.memory_info().rss / 1e6, 1)
        return {PREFIX + k: float(v) for k, v in metrics.items()}

    def _log_one(self) -> None:
        began = time.thread_time()
        with self._lock:
            try:
                self.tracker.log_metrics(self.run_id, self.sample(), step=self.step)
                self.step += 1
            except Exception as e:   # never the reason a trial fails; say it once
                print(f"visiontune: system metrics of run {self.run_id} stopped: {e}",
                      flush=True)
                self._stop.set()
        self.cpu_s += time.thread_time() - began

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            self._log_one()

    def stop(self) -> float:
        """Stop sampling, log a last sample and the sampler's CPU seconds; returns them."""
        if self._stop.is_set():
            return self.cpu_s
        self._stop.set()
        self._thread.join(timeout=self.every_s + 5)
        self._stop.clear()
        self._log_one()
        if not self._stop.is_set():   # that sample was logged: so is the sampler's cost
            self._stop.set()
            try:
                self.tracker.log_metrics(self.run_id,
                                         {PREFIX + "sampler_cpu_seconds": self.cpu_s},
                                         step=self.step)
            except Exception as e:   # never the reason a trial fails
                print(f"visiontune: system metrics of run {self.run_id}: {e}", flush=True)
        return self.cpu_s
