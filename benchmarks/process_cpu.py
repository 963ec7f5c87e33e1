"""CPU time (user + system) that process trees spend in a window, read from /proc via psutil."""

from __future__ import annotations

import contextlib
import resource

import psutil

ProcessKey = tuple[int, float]  # pid and start time: a pid reused meanwhile is another process


def _tree_times(root_pids: list[int]) -> dict[ProcessKey, float]:
    times: dict[ProcessKey, float] = {}
    for pid in root_pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            root = psutil.Process(pid)
            for process in [root, *root.children(recursive=True)]:
                with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                    cpu = process.cpu_times()
                    times[(process.pid, process.create_time())] = cpu.user + cpu.system
    return times


class TreeCpu:
    """CPU seconds the trees under ``root_pids`` use between :meth:`start` and :meth:`stop`.

    A process that starts in the window counts whole; one that exits in it is not counted.
    """

    def __init__(self, root_pids: list[int]):
        self.root_pids = root_pids
        self._before: dict[ProcessKey, float] = {}

    def start(self) -> None:
        self._before = _tree_times(self.root_pids)

    def stop(self) -> float:
        after = _tree_times(self.root_pids)
        return sum(max(0.0, t - self._before.get(key, 0.0)) for key, t in after.items())


class ChildrenCpu:
    """CPU seconds of the child processes that finished (and were waited for) in the window."""

    def start(self) -> None:
        self._before = self._now()

    def stop(self) -> float:
        return self._now() - self._before

    @staticmethod
    def _now() -> float:
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        return usage.ru_utime + usage.ru_stime


class SelfCpu(ChildrenCpu):
    """CPU seconds of this process in the window (a load generator running in it)."""

    @staticmethod
    def _now() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime
