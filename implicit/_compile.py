"""How the solves meet ``torch.compile``, without loading it where nothing compiles.

``torch.compile``'s machinery (``torch._dynamo``) takes about a second to import on a
CPU, as long as torch itself, and ``torch.compiler.disable`` and ``set_stance`` import
it. Until something imports it (``torch.compile`` does, as does ``torch.export``), no
compiled code runs and nothing is being compiled: there is nothing to disable, so the
package asks for it only once it is loaded.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from implicit._torch import compiler_loaded, mark_compiler_disabled

__all__ = ["compiler_loaded", "eager"]

F = TypeVar("F", bound=Callable[..., Any])


def eager(fn: F) -> F:
    """``torch.compiler.disable(fn)``, without loading the compiler before something
    else has.

    A compiled caller breaks its graph at ``fn`` (the solves' loops depend on the
    data), and ``fn`` runs eagerly, with nothing it calls compiled except what the user
    compiled. The wrapper carries dynamo's own mark of a disabled function, which
    dynamo reads while it traces a caller.
    """
    disabled: Callable[..., Any] | None = None

    @functools.wraps(fn)
    def run_eagerly(*args: Any, **kwargs: Any) -> Any:
        nonlocal disabled
        if not compiler_loaded():
            return fn(*args, **kwargs)
        if disabled is None:
            disabled = torch.compiler.disable(fn)
        return disabled(*args, **kwargs)

    mark_compiler_disabled(run_eagerly)
    return run_eagerly  # type: ignore[return-value]
