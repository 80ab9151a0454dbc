"""Stack dumps on demand, for a relay that looks stuck: ``kill -USR1 <pid>`` logs where every
asyncio task of the relay is waiting (one JSON line per task); ``kill -USR2 <pid>`` writes every
thread's Python stack to stderr (`faulthandler`: it works even when the event loop itself is
stuck and SIGUSR1 would never be handled)."""

from __future__ import annotations

import asyncio
import faulthandler
import io
import logging
import signal
import sys

log = logging.getLogger("outbox.stacks")

TASKS = signal.SIGUSR1
THREADS = signal.SIGUSR2


def task_stacks(loop: asyncio.AbstractEventLoop) -> list[dict[str, str]]:
    """Each pending task of ``loop``: its name, what it is running, and where it waits."""
    out = []
    for task in sorted(asyncio.all_tasks(loop), key=lambda t: t.get_name()):
        buf = io.StringIO()
        task.print_stack(file=buf)
        out.append({"task": task.get_name(), "coro": repr(task.get_coro()),
                    "stack": buf.getvalue()})
    return out


def log_task_stacks(loop: asyncio.AbstractEventLoop) -> None:
    stacks = task_stacks(loop)
    log.warning("task dump (SIGUSR1)", extra={"fields": {"tasks": len(stacks)}})
    for entry in stacks:
        log.warning("task", extra={"fields": entry})


def install(loop: asyncio.AbstractEventLoop) -> None:
    """Dump the tasks on SIGUSR1 and the threads on SIGUSR2 (see the module docstring)."""
    loop.add_signal_handler(TASKS, log_task_stacks, loop)
    faulthandler.register(THREADS, file=sys.stderr, all_threads=True)


def uninstall(loop: asyncio.AbstractEventLoop) -> None:
    loop.remove_signal_handler(TASKS)
    faulthandler.unregister(THREADS)
