"""Segmentation worker processes that outlive a predict call.

Starting spawned workers takes seconds (each imports numpy, scipy and scikit-image), which
would dominate every call on a GPU that scores thousands of images a second; so the pool is
kept until it is closed, asked for with another size, or garbage-collected with its owner.
"""

from __future__ import annotations

import multiprocessing
import weakref
from concurrent.futures import ProcessPoolExecutor


class SegmentationWorkers:
    """A lazily started, reusable pool of spawned processes for the CPU-only tree work."""

    def __init__(self) -> None:
        self.executor: ProcessPoolExecutor | None = None
        self.size = 0

    def get(self, size: int) -> ProcessPoolExecutor:
        """The running pool of ``size`` processes, started (or restarted with the new size) if needed."""
        if self.executor is None or self.size != size:
            self.close()
            self.executor = ProcessPoolExecutor(size, mp_context=multiprocessing.get_context("spawn"))
            self.size = size
            weakref.finalize(self, self.executor.shutdown, cancel_futures=True)
        return self.executor

    def close(self) -> None:
        """Stop the processes, if any."""
        if self.executor is not None:
            self.executor.shutdown(cancel_futures=True)
            self.executor = None
