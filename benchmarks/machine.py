"""What every benchmark prints beside its numbers: the machine it measured on; and ``Stopwatch``, how the
throughput benchmarks read time on it."""
from __future__ import annotations

import os
import platform
import time

import torch


def machine() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "device": "cpu",
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name(0)
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        info["cpu"] = platform.processor() or "unknown"
    try:
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    return info


class Stopwatch:
    """Wall-clock and this process's CPU seconds of a ``with`` block, CUDA synchronised at both ends. On a CPU
    shared with other work the wall time also counts the waits for a core; the CPU time counts only our own work
    (with one torch thread it is the steadier figure; on a GPU it is mostly the host waiting)."""

    wall: float
    cpu: float

    @staticmethod
    def _sync() -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def __enter__(self) -> "Stopwatch":
        self._sync()
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self._sync()
        self.wall, self.cpu = time.perf_counter() - self._wall, time.process_time() - self._cpu
