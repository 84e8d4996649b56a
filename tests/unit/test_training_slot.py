"""The machine's training slot: exclusive across processes, and freed when its holder is killed."""

import multiprocessing
import os
import threading
import time
from pathlib import Path

from flows.nightly import training_slot


def _hold_and_die(home: str, ready: "multiprocessing.synchronize.Event") -> None:  # type: ignore[name-defined]
    with training_slot(home):
        ready.set()
        time.sleep(0.5)
        os._exit(137)  # killed while training: no release, no cleanup


def test_a_second_training_waits_for_the_first(tmp_path: Path) -> None:
    order: list[str] = []
    inside = threading.Event()

    def first() -> None:
        with training_slot(str(tmp_path)):
            inside.set()
            time.sleep(0.3)
            order.append("first done")

    thread = threading.Thread(target=first)
    thread.start()
    inside.wait(5)
    with training_slot(str(tmp_path)):  # a separate open file: flock excludes it like another process
        order.append("second in")
    thread.join()
    assert order == ["first done", "second in"]


def test_a_killed_holder_frees_the_slot(tmp_path: Path) -> None:
    context = multiprocessing.get_context("spawn")
    ready = context.Event()
    child = context.Process(target=_hold_and_die, args=(str(tmp_path), ready))
    child.start()
    assert ready.wait(30)
    child.join(30)
    assert child.exitcode == 137
    started = time.monotonic()
    with training_slot(str(tmp_path)):
        waited = time.monotonic() - started
    assert waited < 2.0
