"""Checkpoint files: safe to load, verified, written atomically.

- `save_checkpoint(path, state)` writes a dict of tensors, dicts, lists, tuples, numbers,
  strings and None (nothing else: such a file loads with `torch.load(weights_only=True)`, which
  never runs code) plus a SHA-256 digest of that content under INTEGRITY_KEY. The file is
  written to a temporary name in the same folder, flushed and fsynced, then renamed over
  `path`, so an interrupted save leaves the previous checkpoint intact; temporaries left behind
  by a killed save are removed by the next save. Files get the user's umask (like `open`).
- `load_checkpoint(path)` loads with weights_only=True and checks the digest: a truncated,
  empty, garbage or altered file is a CheckpointError naming the file. A file without a digest
  (another tool's state dict) loads unverified, with a warning. An old pickled checkpoint needs
  `allow_pickle=True`: unpickling can execute arbitrary code, so only for files you trust.
- `verify_checkpoint(path)` checks a file without keeping it.
- `rng_state()` / `set_rng_state()`: the Python, NumPy and torch generators as tensors and
  numbers (the pickled tuples of old checkpoints are still accepted).
"""
from __future__ import annotations

import glob
import hashlib
import logging
import os
import pickle
import random
import secrets
from collections import OrderedDict
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch

__all__ = ["CheckpointError", "INTEGRITY_KEY", "save_checkpoint", "load_checkpoint",
           "verify_checkpoint", "content_digest", "rng_state", "set_rng_state"]

log = logging.getLogger(__name__)

INTEGRITY_KEY = "_integrity"
_FORMAT = 1
_TMP_MARK = ".tmp-"
_ZIP_MAGIC = b"PK\x03\x04"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, fails its checksum or is not safe to load."""


# --------------------------------------------------------------------------- the digest --

_SCALARS = (type(None), bool, int, float, complex, str, bytes)


def _feed(h, value, where: str) -> None:
    """Hashes `value` with its type and structure, so that no two different contents collide
    by accident of encoding. Exact types: what weights_only cannot load (a numpy float, a
    defaultdict, any other object) is refused here, at save time, not at the next load."""
    kind = type(value)
    if kind in _SCALARS or kind in (torch.dtype, torch.device, torch.Size):
        h.update(f"{kind.__name__}:{value!r};".encode())
    elif isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        h.update(f"tensor:{t.dtype}:{tuple(t.shape)}:".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    elif kind in (dict, OrderedDict):
        h.update(f"dict:{len(value)}{{".encode())
        for key, item in value.items():
            _feed(h, key, where)
            _feed(h, item, f"{where}[{key!r}]")
        h.update(b"}")
    elif kind in (list, tuple, set, frozenset):
        items = sorted(value, key=repr) if kind in (set, frozenset) else value
        h.update(f"{kind.__name__}:{len(value)}[".encode())
        for k, item in enumerate(items):
            _feed(h, item, f"{where}[{k}]")
        h.update(b"]")
    else:
        raise TypeError(f"checkpoint{where}: a {kind.__module__}.{kind.__name__} cannot be "
                        "stored (only tensors, dicts, lists, tuples, numbers, strings and None "
                        "load with weights_only=True)")


def content_digest(state: Dict[str, Any]) -> str:
    """SHA-256 of a checkpoint's content (without its integrity record)."""
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in state.items() if k != INTEGRITY_KEY}, "")
    return h.hexdigest()


# ------------------------------------------------------------------------------- saving --

def _remove_stale_temporaries(path: str) -> None:
    folder, name = os.path.split(os.path.abspath(path))
    for stale in glob.glob(os.path.join(glob.escape(folder), f".{glob.escape(name)}{_TMP_MARK}*")):
        try:
            os.remove(stale)
            log.info("removed %s, left by an interrupted save", stale)
        except FileNotFoundError:
            pass


def save_checkpoint(path: str, state: Dict[str, Any]) -> None:
    """Write `state` to `path` atomically with its content digest (see the module docstring).

    One writer per path: temporaries of `path` from earlier saves are deleted first."""
    if not isinstance(state, dict) or INTEGRITY_KEY in state:
        raise ValueError(f"save_checkpoint: state must be a dict without the key {INTEGRITY_KEY!r}")
    record = dict(state)
    record[INTEGRITY_KEY] = {"format": _FORMAT, "sha256": content_digest(state)}
    folder, name = os.path.split(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    _remove_stale_temporaries(path)
    tmp = os.path.join(folder, f".{name}{_TMP_MARK}{secrets.token_hex(4)}")
    # os.open with mode 0o666 lets the kernel apply the umask, as open() does (mkstemp: 0600).
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(record, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


# ------------------------------------------------------------------------------ loading --

def _read(path: str, allow_pickle: bool) -> Tuple[Dict[str, Any], Optional[str]]:
    """(state, its verified digest or None when the file carries none)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path} is a folder, not a file")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): an interrupted copy?")
    with open(path, "rb") as f:
        magic = f.read(4)
    unsafe = (f"checkpoint {path} holds pickled Python objects (an old-format or foreign "
              f"checkpoint), so it cannot be loaded safely; if you trust where it comes from, "
              f"pass --allow-pickle (unpickling can run arbitrary code)")
    if magic != _ZIP_MAGIC:  # torch.save writes a zip; the old format is a bare pickle
        if not magic.startswith(b"\x80"):
            raise CheckpointError(f"checkpoint {path} is damaged or not a checkpoint (it does "
                                  f"not start like a torch.save file)")
        if not allow_pickle:
            raise CheckpointError(unsafe)
    try:
        state = torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except pickle.UnpicklingError as error:
        if not allow_pickle and "weights only" in str(error).lower():
            raise CheckpointError(unsafe) from None
        raise CheckpointError(f"checkpoint {path} is damaged or not a checkpoint "
                              f"({_first_sentence(error)})") from None
    except Exception as error:  # torch raises RuntimeError, EOFError, ValueError, ... on bad bytes
        raise CheckpointError(f"checkpoint {path} is damaged or not a checkpoint "
                              f"({type(error).__name__}: {_first_sentence(error)})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, not a dict")
    integrity = state.pop(INTEGRITY_KEY, None)
    if integrity is None:
        return state, None
    if not isinstance(integrity, dict) or not isinstance(integrity.get("sha256"), str):
        raise CheckpointError(f"checkpoint {path}: malformed {INTEGRITY_KEY} record")
    try:
        digest = content_digest(state)
    except TypeError as error:  # only reachable with allow_pickle
        raise CheckpointError(f"checkpoint {path}: {error}") from None
    if digest != integrity["sha256"]:
        raise CheckpointError(f"checkpoint {path} is corrupted: its content checksum does not "
                              f"match (sha256 {digest[:12]}..., saved {integrity['sha256'][:12]}...)")
    return state, digest


def load_checkpoint(path: str, *, allow_pickle: bool = False) -> Dict[str, Any]:
    """The state saved by save_checkpoint (its digest checked), or another tool's dict.

    Raises FileNotFoundError, or CheckpointError naming the file for anything else."""
    state, digest = _read(path, allow_pickle)
    if digest is None:
        log.warning("checkpoint %s carries no checksum (not written by this harness, or by an "
                    "old version): its integrity cannot be verified", path)
    return state


def verify_checkpoint(path: str) -> str:
    """The content digest of a checkpoint written by save_checkpoint, after checking it;
    CheckpointError if the file is damaged or carries no checksum."""
    _, digest = _read(path, allow_pickle=False)
    if digest is None:
        raise CheckpointError(f"checkpoint {path} carries no checksum to verify")
    return digest


def _first_sentence(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text.split(". ")[0] if text else type(error).__name__


# --------------------------------------------------------------------------- RNG states --

def rng_state() -> Dict[str, Any]:
    """The global generators' states in weights_only-safe types."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64),
                   "gauss_next": gauss},
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    python, numpy_state = state["python"], state["numpy"]
    if isinstance(python, dict):
        python = (python["version"], tuple(int(v) for v in python["state"].tolist()),
                  python["gauss_next"])
    random.setstate(python)
    if isinstance(numpy_state, dict):
        numpy_state = (numpy_state["kind"], numpy_state["keys"].numpy().astype(np.uint32),
                       numpy_state["pos"], numpy_state["has_gauss"], numpy_state["cached_gaussian"])
    np.random.set_state(numpy_state)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
