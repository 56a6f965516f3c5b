"""One small registry used for models, data sets and methods: register once, look up with a helpful error."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from kdtune.errors import ConfigError, did_you_mean

T = TypeVar("T")


class Registry(Generic[T]):
    """A name -> object mapping filled by a decorator.

    >>> MODELS = Registry("model")
    >>> @MODELS.register("resnet8")
    ... def resnet8(num_classes): ...
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}
        self._lazy: dict[str, Callable[[], object]] = {}  # name prefix -> what registers those names

    def register_lazy(self, prefix: str, load: Callable[[], object]) -> None:
        """The names starting with ``prefix`` are registered by ``load()`` (an import), called the first time
        such a name, or a listing that may hold one, is asked for: a heavy module (torchvision, about a second
        to import) is loaded only by the processes that use it."""
        self._lazy[prefix] = load

    def _load(self, pattern: str = "*") -> None:
        """Run the lazy loaders whose names ``pattern`` (a name or an fnmatch pattern) may match."""
        head = re.split(r"[*?\[]", pattern, maxsplit=1)[0]
        for prefix in [p for p in self._lazy if head.startswith(p) or p.startswith(head)]:
            self._lazy.pop(prefix)()

    def register(self, name: str | None = None) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            key = name or getattr(obj, "name", None) or obj.__name__  # type: ignore[attr-defined]
            if key in self._items:
                raise RuntimeError(f"{self.kind} {key!r} is registered twice")
            self._items[key] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        if name not in self._items:
            self._load(name)
        try:
            return self._items[name]
        except KeyError:
            self._load()
            raise ConfigError(
                f"unknown {self.kind} {name!r}{did_you_mean(name, self._items)}; "
                f"valid {self.kind}s: {', '.join(sorted(self._items))}"
            ) from None

    def names(self, pattern: str = "*") -> list[str]:
        self._load(pattern)
        return sorted(n for n in self._items if fnmatch.fnmatch(n, pattern))

    def __contains__(self, name: object) -> bool:
        if isinstance(name, str) and name not in self._items:
            self._load(name)
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        self._load()
        return iter(sorted(self._items))

    def __len__(self) -> int:
        self._load()
        return len(self._items)
