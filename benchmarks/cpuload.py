"""What else ran on the CPU while the benchmark timed, and a way to make something else run.

    from cpuload import BackgroundLoad, OtherProcessesCPU

    meter = OtherProcessesCPU()
    meter.start()
    run.epoch(e)                      # the timed interval
    others = meter.stop()             # CPU seconds other processes used meanwhile (None off Linux)
    meter.wall_s, meter.quiet()       # the interval's length; True when others used < 5 % of a core

    with BackgroundLoad(cores=1):     # one extra process spinning one core until the block ends
        ...                           # time something on a deliberately busy machine

``OtherProcessesCPU`` reads the busy time (user, nice, system, irq, softirq and steal; guest time is
already inside user) of the CPUs this process may run on from /proc/stat, and subtracts this
process's own CPU time (all its threads: ``time.process_time``) over the same interval. A
benchmark can so tell a quiet epoch from one that shared its cores, and keep or flag it; steal time
(another virtual machine on the same physical core) is counted as others' and also reported apart.
/proc/stat counts in clock ticks (10 ms per CPU), so figures below ~0.02 s are noise.

``BackgroundLoad`` starts ``cores`` Python processes, each a pure busy loop on one core, waits
until every one has started, and kills them when the ``with`` block ends, whether normally or by an
exception or KeyboardInterrupt; a loop whose parent has died stops by itself within a fraction
of a second, so none outlives a killed benchmark.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

PROC_STAT = Path("/proc/stat")
# /proc/stat "cpuN" fields: user nice system idle iowait irq softirq steal guest guest_nice
_BUSY_FIELDS = (0, 1, 2, 5, 6, 7)
_STEAL_FIELD = 7


def _cpu_times(cpus) -> tuple[float, float] | None:
    """(busy, steal) seconds of ``cpus`` since boot, from /proc/stat; None where it cannot be read."""
    try:
        lines = PROC_STAT.read_text().splitlines()
    except OSError:
        return None
    tick = os.sysconf("SC_CLK_TCK")
    busy = steal = 0
    for line in lines:
        name, _, rest = line.partition(" ")
        if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in cpus:
            continue
        fields = [int(v) for v in rest.split()]
        busy += sum(fields[i] for i in _BUSY_FIELDS if i < len(fields))
        steal += fields[_STEAL_FIELD] if len(fields) > _STEAL_FIELD else 0
    return busy / tick, steal / tick


def _allowed_cpus() -> set[int]:
    try:
        return os.sched_getaffinity(0)
    except AttributeError:  # not Linux
        return set(range(os.cpu_count() or 1))


class OtherProcessesCPU:
    """CPU seconds that processes other than this one used, over the interval start() … stop().

    After stop(): ``others_s`` (None off Linux), ``own_s`` (this process, all threads), ``steal_s``,
    ``wall_s`` and ``cpus`` (how many CPUs were watched: those this process may run on).
    Usable as a context manager too: ``with OtherProcessesCPU() as m: …``, then ``m.others_s``.
    """

    def __init__(self):
        self.others_s = self.own_s = self.steal_s = self.wall_s = None
        self.cpus = 0
        self._start = None

    def start(self) -> OtherProcessesCPU:
        cpus = _allowed_cpus()
        self.cpus = len(cpus)
        self._start = (cpus, _cpu_times(cpus), time.process_time(), time.perf_counter())
        return self

    def stop(self) -> float | None:
        """Others' CPU seconds since start() (clipped at 0: the tick counts are coarse), or None
        where /proc/stat is unavailable."""
        if self._start is None:
            raise RuntimeError("OtherProcessesCPU.stop() before start()")
        wall, own = time.perf_counter(), time.process_time()
        cpus, before, own0, wall0 = self._start
        after = _cpu_times(cpus)
        self.wall_s, self.own_s = wall - wall0, own - own0
        if before is None or after is None:
            self.others_s = self.steal_s = None
        else:
            self.steal_s = after[1] - before[1]
            self.others_s = max(0.0, after[0] - before[0] - self.own_s)
        return self.others_s

    def quiet(self, fraction: float = 0.05) -> bool | None:
        """Whether others used less than ``fraction`` of one core over the interval (None: unknown)."""
        if self.others_s is None:
            return None
        return self.others_s < fraction * self.wall_s

    def __enter__(self) -> OtherProcessesCPU:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# A busy loop that announces itself, then spins until killed or orphaned (its parent gone).
_SPIN = """
import os, sys
parent = os.getppid()
sys.stdout.write("spinning\\n")
sys.stdout.flush()
while os.getppid() == parent:
    for _ in range(100000):
        pass
"""


class BackgroundLoad:
    """``cores`` subprocesses, each busy-looping one core from ``__enter__`` until ``__exit__``."""

    def __init__(self, cores: int = 1):
        if cores < 0:
            raise ValueError(f"cores must be ≥ 0, not {cores}")
        self.cores = cores
        self.processes: list[subprocess.Popen] = []

    def __enter__(self) -> BackgroundLoad:
        try:
            for _ in range(self.cores):
                self.processes.append(
                    subprocess.Popen(
                        [sys.executable, "-c", _SPIN],
                        stdin=subprocess.DEVNULL,
                        stdout=subprocess.PIPE,
                        stderr=subprocess.DEVNULL,
                        text=True,
                    )
                )
            for p in self.processes:  # started, not just forked: the load is on from here
                if p.stdout.readline().strip() != "spinning":
                    raise RuntimeError(f"a busy-loop process exited at once (status {p.wait()})")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Kill every loop and reap it; safe to call twice."""
        for p in self.processes:
            if p.poll() is None:
                p.kill()
        for p in self.processes:
            p.wait()
            if p.stdout is not None:
                p.stdout.close()
        self.processes = []

    def __exit__(self, *exc) -> None:
        self.stop()
