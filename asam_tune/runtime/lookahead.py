"""Peeking one optimizer step ahead in a loader, so the worker gets the next step's batch."""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

__all__ = ["peek_ahead"]

_END = object()


def peek_ahead(loader: Iterable, accumulation_steps: int, on_peek: Callable[[Any], None],
               on_step_end: Callable[[], None]) -> Iterator[Any]:
    """Yield the loader's batches unchanged; at each step's first batch, ``on_peek(first batch
    of the next step, or None at the end)``; after each step's last batch, ``on_step_end()``.

    Every ``accumulation_steps`` batches make one optimizer step, so the loader is read up to
    that many batches ahead.
    """
    k = accumulation_steps
    iterator, ahead = iter(loader), []
    index = 0
    while True:
        while len(ahead) <= k:
            ahead.append(next(iterator, _END))
        current = ahead.pop(0)
        if current is _END:
            return
        if index % k == 0:
            following = ahead[k - 1]
            on_peek(None if following is _END else following)
        try:
            yield current
        finally:
            if index % k == k - 1:
                on_step_end()
        index += 1
