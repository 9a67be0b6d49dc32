"""The tuner's choices on disk, so that a new process — and a graph that
torch.compile traces, where nothing can be timed — starts from what an
earlier process measured instead of re-tuning or guessing.

One JSON file per environment: the GPU model (name and compute capability)
and the versions of Triton, torch, CUDA, cuDNN and resnet_fused. A choice
measured under one of them says nothing about another (a new Triton
compiles the same tiling differently, a new cuDNN has other kernels), so an
upgrade simply starts a new file; a stale one is never rewritten and can be
deleted. The file name is a hash of the environment, and the environment
is also stored inside: a file whose contents do not match its name (copied
from another machine, an older format) is ignored with one warning, as is a
file that is not valid JSON. Nothing here ever raises into a forward pass:
an unreadable or unwritable cache only costs re-tuning.

    {"format": 1, "environment": {...}, "choices": {problem: choice}}

`problem` is the tuning key as text without the device index (two GPUs of
the same model share choices); `choice` is "cudnn", "cudnn_fused" or a tiling's fields.

Where: `$RESNET_FUSED_CACHE_DIR`, else `$XDG_CACHE_HOME/resnet_fused`, else
`~/.cache/resnet_fused`. `RESNET_FUSED_TUNING_CACHE=0` turns it off (no
reads, no writes). Under TRITON_INTERPRET=1 it is off unless
RESNET_FUSED_CACHE_DIR is set explicitly (the tests point it at a
temporary directory), so test runs never write to a user's cache.

Concurrent processes: a write takes an exclusive `flock` on a lock file
beside the cache, re-reads the file, merges its new entries and replaces
the file atomically (temporary file in the same directory, then
`os.replace`), so readers never see a partial file and no writer's entries
are lost. Without `fcntl` (Windows) the replace is still atomic; two
writers racing may then drop one's entry, which only costs a re-tune.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Optional, Union

import torch

from resnet_fused.ops.triton import conv, interpreting

FORMAT = 1
CUDNN = "cudnn"
CUDNN_FUSED = "cudnn_fused"  # cudnn_fused.py
Choice = Union[conv.ConvConfig, str]

_warned: set = set()


def enabled() -> bool:
    flag = os.environ.get("RESNET_FUSED_TUNING_CACHE", "1").strip().lower()
    if flag in ("0", "off", "false", "no"):
        return False
    return not interpreting() or bool(os.environ.get("RESNET_FUSED_CACHE_DIR"))


def directory() -> Optional[Path]:
    """Where the files live; None (and no disk cache, with one warning) where
    no home directory can be found and no variable says where."""
    explicit = os.environ.get("RESNET_FUSED_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg).expanduser() / "resnet_fused"
    try:
        return Path.home() / ".cache" / "resnet_fused"
    except (RuntimeError, KeyError):  # no HOME and no passwd entry (some containers)
        if "no home" not in _warned:
            _warned.add("no home")
            warnings.warn("resnet_fused: no home directory for the tuning cache; set RESNET_FUSED_CACHE_DIR to "
                          "keep tuned choices across processes", stacklevel=3)
        return None


def environment(device: torch.device) -> Optional[dict]:
    """What a choice measured on `device` depends on besides the problem, or
    None where it cannot be known (a fake CUDA device on a machine without
    one): then nothing is read or written."""
    import triton

    import resnet_fused

    env = {
        "format": FORMAT,
        "triton": triton.__version__,
        "torch": torch.__version__,
        "resnet_fused": resnet_fused.__version__,
    }
    if device.type == "cuda":
        try:
            index = device.index if device.index is not None else torch.cuda.current_device()
            major, minor = torch.cuda.get_device_capability(index)
            env.update(gpu=torch.cuda.get_device_name(index), capability=f"{major}.{minor}",
                       cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
        except Exception:  # no driver, no such device: nothing to key on
            return None
    else:  # only under the interpreter (tests): choices there say nothing about a GPU
        env.update(gpu=device.type, capability="", cuda=None, cudnn=None)
    return env


def path_for(env: dict) -> Optional[Path]:
    where = directory()
    if where is None:
        return None
    digest = hashlib.sha256(json.dumps(env, sort_keys=True).encode()).hexdigest()[:16]
    return where / f"conv_bn_act-{digest}.json"


def encode(choice: Choice):
    return choice if isinstance(choice, str) else dataclasses.asdict(choice)


def decode(value) -> Optional[Choice]:
    """A choice from its stored form, or None where it is not one."""
    if value in (CUDNN, CUDNN_FUSED):
        return value
    if isinstance(value, dict) and all(type(v) is int and v > 0 for v in value.values()):
        try:
            return conv.ConvConfig(**value)
        except TypeError:  # a field this version does not have
            return None
    return None


def _warn_once(path: Path, kind: str, why: str) -> None:
    """One warning per file and kind of trouble (a cache read on every new
    shape must not repeat it)."""
    if (path, kind) in _warned:
        return
    _warned.add((path, kind))
    warnings.warn(f"resnet_fused: tuning cache {path}: {why}", stacklevel=3)


def _read(path: Path, env: dict) -> dict[str, Choice]:
    """The choices in `path` for `env`; {} (with one warning) where the file
    is unreadable, not JSON, another format or another environment's."""
    try:
        text = path.read_text(encoding="utf-8")
    except (FileNotFoundError, NotADirectoryError):  # nothing stored yet (a write says if it cannot be)
        return {}
    except OSError as e:
        _warn_once(path, "read", f"unreadable ({e}); ignored, shapes are tuned again")
        return {}
    except UnicodeDecodeError:
        text = ""  # binary garbage: not JSON either
    try:
        data = json.loads(text)
    except ValueError:
        _warn_once(path, "read", "not valid JSON; ignored, shapes are tuned again")
        return {}
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("choices"), dict):
        _warn_once(path, "read", f"not a format-{FORMAT} tuning cache; ignored, shapes are tuned again")
        return {}
    if data.get("environment") != env:
        _warn_once(path, "read", f"recorded for another environment ({data.get('environment')}); ignored, "
                         "shapes are tuned again")
        return {}
    choices = {}
    for problem, value in data["choices"].items():
        choice = decode(value)
        if choice is not None:  # an entry this version cannot read is skipped, not fatal
            choices[problem] = choice
    return choices


def load(env: dict) -> dict[str, Choice]:
    path = path_for(env) if enabled() else None
    return {} if path is None else _read(path, env)


@contextlib.contextmanager
def _exclusive(lock_path: Path):
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: atomic replace only
        yield
        return
    with open(lock_path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def store(env: dict, new: dict[str, Choice]) -> None:
    """Add `new` (problem -> choice) to env's file: merged with what other
    processes wrote meanwhile, replaced atomically. A failure (read-only or
    full disk) warns once and is otherwise ignored."""
    path = path_for(env) if enabled() and new else None
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _exclusive(path.with_suffix(".lock")):
            merged = {p: encode(c) for p, c in _read(path, env).items()}
            merged.update({p: encode(c) for p, c in new.items()})
            text = json.dumps({"format": FORMAT, "environment": env, "choices": merged}, indent=1, sort_keys=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    f.write(text)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
    except OSError as e:
        _warn_once(path, "write", f"cannot be written ({e}); choices last for this process only")
