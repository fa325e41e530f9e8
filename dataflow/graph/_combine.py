"""Built-in merge combiners: ``concat``, ``stack``, ``sum``, ``mean``, ``list``."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["combiner"]


def _is_tensor(x: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def combiner(name: str, dim: int = 0) -> Callable[[Sequence[Any]], Any]:
    """The combine function for a built-in merge: ``parts -> result``."""

    def concat(parts: Sequence[Any]) -> Any:
        if parts and isinstance(parts[0], str):
            return "".join(parts)
        if parts and _is_tensor(parts[0]):
            import torch

            return torch.cat(list(parts), dim=dim)
        out: list[Any] = []
        for part in parts:
            out.extend(part)
        return tuple(out) if parts and isinstance(parts[0], tuple) else out

    def stack(parts: Sequence[Any]) -> Any:
        import torch

        return torch.stack(list(parts), dim=dim)

    def sum_(parts: Sequence[Any]) -> Any:
        total = parts[0]
        for part in parts[1:]:
            total = total + part
        return total

    def mean(parts: Sequence[Any]) -> Any:
        return sum_(parts) / len(parts)

    def as_list(parts: Sequence[Any]) -> Any:
        return list(parts)

    table: dict[str, Callable[[Sequence[Any]], Any]] = {
        "concat": concat,
        "stack": stack,
        "sum": sum_,
        "mean": mean,
        "list": as_list,
    }
    fn = table[name]
    fn.__name__ = f"merge_{name}"
    return fn
