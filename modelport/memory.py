"""Handing freed heap back to the OS.

glibc keeps freed blocks in its arenas for reuse, so a server's RSS ratchets up after unusual
work (a burst of odd batch shapes, a model unloaded) even though the memory is free. Measured on
the default model: RSS 4.7-13 % above its warmed-up level after fuzz runs, and +16 % over 100
load/unload cycles, without trimming; within 2.5 % with it. A trim costs ~0.2 ms.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
from typing import Callable

try:
    _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
except (OSError, AttributeError):  # not glibc: nothing to trim
    _malloc_trim = None


def trim_heap() -> None:
    if _malloc_trim is not None:
        _malloc_trim(0)


def release_memory() -> None:
    """After an unload: collect the runtime's cycles, then return the pages."""
    gc.collect()
    trim_heap()


async def trim_when_idle(is_idle: Callable[[], bool], interval_s: float = 1.0) -> None:
    """Trim once per interval while nothing is running: under load the next batch would only
    fault the pages back in. Runs until cancelled."""
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(interval_s)
        if is_idle():
            await loop.run_in_executor(None, trim_heap)
