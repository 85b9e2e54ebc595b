"""Hook utilities: read a module's input, change its output, skip modules, stop a forward early.

Everything here is a context manager that removes its hooks (or restores the patched ``forward``) on exit, also when
the forward raises. Tensors are passed through untouched unless a function is given to change them.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, ContextManager, Iterable, Iterator, Mapping

from torch import Tensor, nn


class StopForward(Exception):
    """Raised by a hook to end a forward pass once everything needed has been read (see :func:`capture_inputs`)."""


def _first_input(args: tuple, kwargs: dict) -> Tensor:
    if args:
        return args[0]
    for key in ("hidden_states", "input", "x"):
        if key in kwargs:
            return kwargs[key]
    raise RuntimeError(f"cannot find the input tensor of a module call (kwargs: {sorted(kwargs)})")


def _replace_first_input(args: tuple, kwargs: dict, value: Tensor) -> tuple[tuple, dict]:
    if args:
        return (value, *args[1:]), kwargs
    for key in ("hidden_states", "input", "x"):
        if key in kwargs:
            return args, {**kwargs, key: value}
    raise RuntimeError(f"cannot find the input tensor of a module call (kwargs: {sorted(kwargs)})")


def _output_tensor(output: Any) -> Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


@contextmanager
def _capture(
    modules: Mapping[str, nn.Module], which: str, stop_after: str | None, detach: bool
) -> Iterator[dict[str, Tensor]]:
    """Hooks recording each module's input (``which="in"``, before it runs) or output tensor; see the callers."""
    got: dict[str, Tensor] = {}

    def record(name: str, x: Tensor) -> None:
        got[name] = x.detach() if detach else x
        if name == stop_after:
            raise StopForward

    handles = []
    for name, m in modules.items():
        if which == "in":
            hook = lambda mod, args, kwargs, name=name: record(name, _first_input(args, kwargs))  # noqa: E731
            handles.append(m.register_forward_pre_hook(hook, with_kwargs=True))
        else:
            hook = lambda mod, args, output, name=name: record(name, _output_tensor(output))  # noqa: E731
            handles.append(m.register_forward_hook(hook))
    try:
        yield got
    except StopForward:
        pass
    finally:
        for h in handles:
            h.remove()


def capture_inputs(
    modules: Mapping[str, nn.Module], stop_after: str | None = None, detach: bool = True
) -> ContextManager[dict[str, Tensor]]:
    """Record the first positional input of each module (e.g. the key ``k`` entering an MLP output projection).

    Yields a dict filled during the forward: name -> input tensor (batch, seq, dim) of the module's latest call.
    With ``stop_after`` (one of the names), the forward is aborted with :class:`StopForward` as soon as that module
    has been reached (before it runs); the exception is swallowed by this context manager.
    """
    return _capture(modules, "in", stop_after, detach)


def capture_outputs(
    modules: Mapping[str, nn.Module], stop_after: str | None = None, detach: bool = True
) -> ContextManager[dict[str, Tensor]]:
    """Record the output tensor (first element if the module returns a tuple) of each module; yields name -> tensor.

    With ``stop_after`` (one of the names) the forward is aborted right after that module ran.
    """
    return _capture(modules, "out", stop_after, detach)


@contextmanager
def edit_output(module: nn.Module, fn: Callable[[Tensor], Tensor]) -> Iterator[None]:
    """Replace the module's output tensor ``y`` by ``fn(y)`` (inside a tuple output, only the first element)."""

    def hook(m: nn.Module, args: tuple, output: Any) -> Any:
        if isinstance(output, tuple):
            return (fn(output[0]), *output[1:])
        if isinstance(output, list):
            return [fn(output[0]), *output[1:]]
        return fn(output)

    h = module.register_forward_hook(hook)
    try:
        yield
    finally:
        h.remove()


@contextmanager
def replace_input(module: nn.Module, value: Tensor) -> Iterator[None]:
    """Feed ``value`` to the module instead of the first input it is called with (shapes must match)."""

    def hook(m: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        x = _first_input(args, kwargs)
        if x.shape != value.shape:
            raise RuntimeError(f"replace_input: module called with shape {tuple(x.shape)}, replacement {tuple(value.shape)}")
        return _replace_first_input(args, kwargs, value)

    h = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        h.remove()


@contextmanager
def skip_modules(modules: Iterable[nn.Module], tuple_output: bool = False) -> Iterator[None]:
    """Make each module return its first input unchanged (a decoder layer becomes the identity on the residual).

    Done by shadowing ``forward`` on the instance, so the model's own loop, indices and masks stay as they are, and
    hooks on the skipped modules still fire. ``tuple_output``: return ``(input,)`` (decoder layers of older
    transformers versions return tuples).
    """
    patched = []

    def identity(*args: Any, **kwargs: Any) -> Any:
        x = _first_input(args, kwargs)
        return (x,) if tuple_output else x

    try:
        for m in modules:
            m.forward = identity  # type: ignore[method-assign]
            patched.append(m)
        yield
    finally:
        for m in patched:
            del m.forward


@contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """Temporarily set ``requires_grad=False`` on every parameter of ``model`` (flags restored on exit), so that a
    backward pass for an activation-level variable (ROME's δ) computes no weight gradients and leaves no ``.grad``."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in flags:
            p.requires_grad_(f)
