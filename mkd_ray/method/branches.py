"""Run the two branches of a step (teacher and student i) one after the other or side by side.

On a CPU the kernels of a step on small crops are too small to keep several threads busy:
two threads on one convolution gain far less than two convolutions on one thread each. So
with `parallel(threads_each)` each branch's forwards, and each student's backward, run on a
thread of their own with `threads_each` torch threads. The branches share no autograd graph
(a student's loss reads the other branch only through detached pseudo-labels), so their
backwards may run concurrently; accumulation into each student's .grad stays in its thread.
"""

from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Optional, TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")
_AUTOCAST_DEVICES = ("cpu", "cuda")


class BranchRunner:
    """`map(fn, items)`: in order on this thread, or on one thread per item once `parallel`."""

    def __init__(self) -> None:
        self.threads_each: Optional[int] = None
        self._pool: Optional[ThreadPoolExecutor] = None

    @property
    def is_parallel(self) -> bool:
        return self.threads_each is not None

    def parallel(self, threads_each: int, branches: int = 2) -> None:
        """Run up to `branches` items at once, each thread (and this one) at `threads_each`
        torch threads: the process then uses about `branches * threads_each` cores."""
        torch.set_num_threads(threads_each)
        self._start_pool(threads_each, branches)

    def _start_pool(self, threads_each: int, branches: int = 2) -> None:
        self.threads_each = threads_each
        self._pool = ThreadPoolExecutor(branches, thread_name_prefix="mkd-branch", initializer=torch.set_num_threads,
                                        initargs=(threads_each,))

    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
        items = list(items)
        if self._pool is None or len(items) < 2:
            return [fn(item) for item in items]
        enter = _caller_context()

        def in_context(item: T) -> R:
            with enter():
                return fn(item)

        return list(self._pool.map(in_context, items))

    # A module holding a runner must still deep-copy and pickle: the pool is rebuilt, not
    # copied, and the copy leaves the threads of the process it lands in as they are.
    def __getstate__(self) -> dict:
        return {"threads_each": self.threads_each}

    def __setstate__(self, state: dict) -> None:
        self.__init__()
        if state["threads_each"] is not None:
            self._start_pool(state["threads_each"])


def _caller_context() -> Callable[[], contextlib.ExitStack]:
    """Grad mode and autocast are per thread: capture the caller's, to re-enter in a worker."""
    grad = torch.is_grad_enabled()
    casts = [(d, torch.get_autocast_dtype(d)) for d in _AUTOCAST_DEVICES if torch.is_autocast_enabled(d)]

    def enter() -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        stack.enter_context(torch.set_grad_enabled(grad))
        for device_type, dtype in casts:
            stack.enter_context(torch.autocast(device_type, dtype=dtype, cache_enabled=False))  # as autocast_context
        return stack

    return enter
