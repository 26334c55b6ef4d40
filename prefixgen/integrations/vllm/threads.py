"""Daemon threads for the connector's lookups and loads that a read hanging forever cannot hold up."""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from typing import Any


class Threads:
    """Daemon threads running submitted calls in order. A thread stuck in a call (a read that never returns)
    can be written off (:meth:`replace`): a new thread takes its place, and the stuck one exits if its call
    ever returns. Unlike ``ThreadPoolExecutor``, whose threads the interpreter joins at exit and whose
    ``shutdown(wait=True)`` joins them too, a hung read holds up neither shutdown nor the process's end."""

    def __init__(self, threads: int, name: str):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._name = name
        self._lock = threading.Lock()
        self._retired: set[int] = set()  # idents of threads written off
        self._started = 0
        self._live = 0
        for _ in range(threads):
            self._start()

    def _start(self) -> None:
        self._started += 1
        self._live += 1
        threading.Thread(target=self._run, name=f"{self._name}-{self._started}", daemon=True).start()

    def submit(self, fn: Any, *args: Any) -> Future:
        future: Future = Future()
        self._queue.put((future, fn, args))
        return future

    def replace(self, ident: int) -> None:
        """Write off thread ``ident`` (stuck in its call): start another in its place."""
        with self._lock:
            if ident not in self._retired:
                self._retired.add(ident)
                self._start()

    def shutdown(self) -> None:
        """Let the threads end after their current call; wait for none of them."""
        with self._lock:
            for _ in range(self._live):
                self._queue.put(None)

    def _run(self) -> None:
        me = threading.get_ident()
        while (item := self._queue.get()) is not None:
            future, fn, args = item
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args))
                except BaseException as exc:  # handed to whoever asks the future
                    future.set_exception(exc)
            with self._lock:
                if me in self._retired:  # replaced while stuck: the new thread does its work now
                    self._retired.discard(me)
                    self._live -= 1
                    return
        with self._lock:
            self._live -= 1
