"""Backend registry: which implementation serves each fused op, per device.

A backend is a named set of op implementations plus a check that says whether
it can run here and, if not, why. Selection is global (`set_backend`) or
scoped (`with backend(name):`, per thread and per asyncio task); `auto`
picks per device and never fails, warning once when it has to fall back.
"""
from __future__ import annotations

import contextlib
import contextvars
import threading
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch

NAMES = ("auto", "eager", "triton", "cuda", "cpu")

# What `auto` tries, best first, per (device type, op); anything else gets
# eager. On CPU the cpu backend serves training too: its batch_norm_act
# kernels are level with or ahead of torch's composition in a whole training
# step (measured, docs/performance.md "Training on CPU").
_AUTO_ORDER = {
    ("cuda", "conv_bn_act"): ("triton", "cuda", "eager"),
    ("cuda", "batch_norm_act"): ("triton", "cuda", "eager"),
    ("cpu", "conv_bn_act"): ("cpu", "eager"),
    ("cpu", "batch_norm_act"): ("cpu", "eager"),
    # the BN half of ops.conv_bn_act_train follows batch_norm_act
    ("cuda", "batch_norm_act_parts"): ("triton", "cuda", "eager"),
    ("cpu", "batch_norm_act_parts"): ("cpu", "eager"),
}


@dataclass
class Backend:
    name: str
    # device types whose tensors this backend computes on
    device_types: tuple[str, ...]
    # op name -> implementation
    ops: dict[str, Callable] = field(default_factory=dict)
    # returns None when usable, else a sentence saying why not and how to fix it
    unavailable_reason: Callable[[], Optional[str]] = lambda: None


_REGISTRY: dict[str, Backend] = {}
_default = "auto"
_scoped: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("resnet_fused_backend", default=None)
_warned: set[str] = set()  # reasons already reported
_warned_lock = threading.Lock()


def register(backend: Backend) -> None:
    if backend.name not in NAMES or backend.name == "auto":
        raise ValueError(f"unknown backend name {backend.name!r}")
    _REGISTRY[backend.name] = backend


def registered(name: str) -> Backend:
    """The registered backend `name` itself (for tools that inspect or wrap
    its ops, e.g. validate's self-test); KeyError where this build has none."""
    _check_name(name)
    return _REGISTRY[name]


def device_types(name: str) -> tuple[str, ...]:
    """The device types whose tensors backend `name` computes on (() where
    it is not registered in this build)."""
    _check_name(name)
    b = _REGISTRY.get(name)
    return () if b is None else b.device_types


def _check_name(name: str) -> None:
    if not isinstance(name, str) or name not in NAMES:
        raise ValueError(f"backend must be one of {', '.join(map(repr, NAMES))}; got {name!r}")


def reason_unavailable(name: str) -> Optional[str]:
    """None if backend `name` can run in this process, else why it cannot."""
    _check_name(name)
    if name == "auto":
        return None
    if name not in _REGISTRY:
        return (
            f"the {name!r} backend is not part of resnet_fused {_version()} yet; "
            f"use one of {available_backends()} or 'auto'"
        )
    return _REGISTRY[name].unavailable_reason()


def available_backends() -> list[str]:
    """Concrete backends usable in this process (`auto` is always usable too)."""
    return [n for n in NAMES if n != "auto" and n in _REGISTRY and _REGISTRY[n].unavailable_reason() is None]


def status() -> dict[str, Optional[str]]:
    """Every backend name -> None if usable, else the reason it is not."""
    return {n: reason_unavailable(n) for n in NAMES}


def get_backend() -> str:
    """The backend name in force in this thread/task (possibly 'auto')."""
    scoped = _scoped.get()
    return scoped if scoped is not None else _default


def _require_available(name: str) -> None:
    reason = reason_unavailable(name)
    if reason is not None:
        raise RuntimeError(f"resnet_fused backend {name!r} is unavailable: {reason}")


def set_backend(name: str) -> None:
    """Select the backend for all threads (unless a `backend()` scope overrides it)."""
    _check_name(name)
    _require_available(name)
    global _default
    _default = name


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    """Use backend `name` inside the `with` block (this thread/task only)."""
    _check_name(name)
    _require_available(name)
    token = _scoped.set(name)
    try:
        yield
    finally:
        _scoped.reset(token)


def mark_reported(reason: str) -> None:
    """Record that `reason` was already told to the user (e.g. at import), so
    auto's fallback does not repeat it."""
    with _warned_lock:
        _warned.add(reason)


def _warn_once(reason: str, message: str) -> None:
    with _warned_lock:
        if reason in _warned:
            return
        _warned.add(reason)
    warnings.warn(message, RuntimeWarning, stacklevel=4)


def resolve_name(op: str, device: torch.device) -> str:
    """The name of the backend that `resolve(op, device)` would use, without
    warning or raising: an explicit selection as it is, `auto`'s first usable
    choice, "eager" otherwise."""
    name = get_backend()
    if name != "auto":
        return name
    for candidate in _AUTO_ORDER.get((device.type, op), ("eager",)):
        b = _REGISTRY.get(candidate)
        if b is not None and op in b.ops and b.unavailable_reason() is None:
            return candidate
    return "eager"


def resolve_module_op(op: str, serving: str, device: torch.device) -> Optional[Callable]:
    """The op `op` of the backend that serves `serving` on `device` (a
    module-level op such as the cpu backend's `conv_bn_act_module`, or the
    serving op itself, to read what it declares), or None where that
    backend has none. One decision with `resolve`: the backend that would
    run the tensor op runs the module op. Neither warns nor raises."""
    b = _REGISTRY.get(resolve_name(serving, device))
    return None if b is None else b.ops.get(op)


def resolve(op: str, device: torch.device) -> Callable:
    """The implementation of `op` for tensors on `device` under the current selection."""
    name = get_backend()
    if name != "auto":
        b = _REGISTRY.get(name)
        if b is None:
            _require_available(name)  # raises with the reason
        if device.type not in b.device_types:
            raise RuntimeError(
                f"resnet_fused backend {name!r} runs on {'/'.join(b.device_types)} tensors, "
                f"but the input is on {device}; use backend('auto') or move the tensors"
            )
        reason = b.unavailable_reason()
        if reason is not None:
            raise RuntimeError(f"resnet_fused backend {name!r} is unavailable: {reason}")
        return b.ops[op]
    for candidate in _AUTO_ORDER.get((device.type, op), ("eager",)):
        b = _REGISTRY.get(candidate)
        if b is None or op not in b.ops:
            continue  # not implemented in this release: nothing to fall back from
        reason = b.unavailable_reason()
        if reason is None:
            return b.ops[op]
        _warn_once(
            reason,
            f"resnet_fused: backend {candidate!r} is unavailable for {device.type} tensors "
            f"({reason}); falling back to the next backend",
        )
    return _REGISTRY["eager"].ops[op]


def _version() -> str:
    from resnet_fused import __version__

    return __version__
