"""States as trees: tensors nested in tuples, lists and dicts (pytrees).

A state (``z0``, and what ``f``/``g`` return) may be a tensor or any nesting of
tuples, lists, named tuples and dicts whose leaves are tensors. The solvers see one
flat ``(B, n)`` view of its leaves (:mod:`implicit._problem`); this module turns a tree
into its leaves and a :class:`Spec`, and back. Our own few lines rather than
``torch.utils._pytree``, which is private.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch


@dataclasses.dataclass(frozen=True)
class Spec:
    """The structure of a tree: its containers and where its leaves go.

    Attributes:
        kind: the container's type (``tuple``, ``list``, ``dict`` or a named tuple
            class), or ``None`` for a leaf.
        keys: a dict's keys, in order (empty otherwise).
        children: the specs of the container's items.
    """

    kind: type | None
    keys: tuple[Any, ...] = ()
    children: tuple[Spec, ...] = ()

    @property
    def is_leaf(self) -> bool:
        return self.kind is None

    @property
    def leaves(self) -> int:
        """The number of leaves."""
        return 1 if self.is_leaf else sum(child.leaves for child in self.children)

    def describe(self) -> str:
        """The structure in words, for error messages."""
        if self.is_leaf:
            return "a tensor"
        if self.kind is dict:
            return "a dict with keys " + repr(list(self.keys))
        return f"a {self.kind.__name__} of {len(self.children)} item(s)"


#: The spec of every leaf (:func:`flatten` returns this one object for a leaf, so that a
#: leaf state is recognised by identity).
LEAF = Spec(None)


def _items(tree: Any) -> tuple[type, tuple[Any, ...], tuple[Any, ...]] | None:
    """The container type, keys and items of a tree node; ``None`` for a leaf."""
    if isinstance(tree, dict):
        return dict, tuple(tree), tuple(tree.values())
    if isinstance(tree, (tuple, list)):
        return type(tree), (), tuple(tree)
    return None


def flatten(tree: Any, name: str) -> tuple[list[Any], Spec, list[str]]:
    """The leaves of ``tree`` (in order), its spec, and each leaf's path for messages
    (``name`` itself for a leaf, e.g. ``"z0['h'][1]"`` inside containers).

    Raises:
        ValueError: an empty container (it has nothing to solve for).
    """
    leaves: list[Any] = []
    paths: list[str] = []

    def visit(node: Any, path: str) -> Spec:
        items = _items(node)
        if items is None:
            leaves.append(node)
            paths.append(path)
            return LEAF
        kind, keys, values = items
        if not values:
            raise ValueError(f"{path} is an empty {kind.__name__}: there is nothing to solve for")
        labels = [repr(k) for k in keys] if keys else [str(i) for i in range(len(values))]
        children = tuple(visit(v, f"{path}[{label}]") for v, label in zip(values, labels))
        return Spec(kind, keys, children)

    spec = visit(tree, name)
    return leaves, spec, paths


def leaves_like(spec: Spec, tree: Any, name: str, like: str) -> list[Any]:
    """The leaves of ``tree``, which must have the structure ``spec``.

    Args:
        spec: the expected structure.
        tree: the tree to read (e.g. what ``f`` returned).
        name: what ``tree`` is called in messages (``"f"``).
        like: what ``spec`` is the structure of (``"z"``).

    Raises:
        ValueError: the structures differ; the message shows where.
    """
    leaves: list[Any] = []

    def visit(node_spec: Spec, node: Any, path: str) -> None:
        if node_spec.is_leaf:
            leaves.append(node)
            return
        items = _items(node)
        same = items is not None and _same_kind(node_spec.kind, items[0])
        if same and node_spec.kind is dict:
            same = set(items[1]) == set(node_spec.keys)
        if same and len(items[2]) != len(node_spec.children):
            same = False
        if not same:
            where = f" at {path}" if path else ""
            raise ValueError(
                f"{name} must return the same structure as {like}: expected "
                f"{node_spec.describe()}{where}, got {_describe_value(node)}"
            )
        if node_spec.kind is dict:
            for key, child in zip(node_spec.keys, node_spec.children):
                visit(child, node[key], f"{path}[{key!r}]")
        else:
            for i, (child, value) in enumerate(zip(node_spec.children, items[2])):
                visit(child, value, f"{path}[{i}]")

    visit(spec, tree, "")
    return leaves


def _same_kind(expected: type, got: type) -> bool:
    """Tuples and lists stand for each other (a function may build either); dicts and
    named tuples must match."""
    sequences = (tuple, list)
    if expected in sequences and got in sequences:
        return True
    return expected is got


def unflatten(spec: Spec, leaves: list[Any]) -> Any:
    """The tree of structure ``spec`` with these leaves (the inverse of :func:`flatten`)."""
    iterator = iter(leaves)

    def build(node_spec: Spec) -> Any:
        if node_spec.is_leaf:
            return next(iterator)
        items = [build(child) for child in node_spec.children]
        if node_spec.kind is dict:
            return dict(zip(node_spec.keys, items))
        if hasattr(node_spec.kind, "_fields"):  # a named tuple
            return node_spec.kind(*items)
        return node_spec.kind(items)

    return build(spec)


def tree_map(fn: Callable[[torch.Tensor], Any], tree: Any) -> Any:
    """``fn`` applied to every leaf of ``tree``, keeping its structure."""
    leaves, spec, _ = flatten(tree, "tree")
    return unflatten(spec, [fn(leaf) for leaf in leaves])


def _describe_value(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    if isinstance(value, dict):
        return "a dict with keys " + repr(list(value))
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)} item(s)"
    return f"a {type(value).__name__}"
