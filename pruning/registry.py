"""One small name -> object registry, used for adapters, scorers and methods.

Why: an unknown name should fail with the list of choices and near matches, and a clashing name should fail at
import time, not silently replace an existing entry (lm-eval's registry does the same).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Generic, TypeVar

from pruning.errors import PruningError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, *names: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            for name in names:
                if name in self._items and self._items[name] is not obj:
                    raise ValueError(f"{self.kind} name {name!r} is already registered to {self._items[name]!r}")
                self._items[name] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        if name not in self._items:
            near = difflib.get_close_matches(name, self._items, n=3)
            hint = f" Did you mean {', '.join(near)}?" if near else ""
            raise PruningError(f"unknown {self.kind} {name!r}; choices: {', '.join(sorted(self._items))}.{hint}")
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items
