"""Training checkpoints: a nested state (dicts, lists, numbers, strings, None and NumPy arrays)
in one ``.npz`` file, written atomically.

    fastdl.checkpoint.save("run/checkpoint.npz", {"model": model.state_dict(), "epoch": 3})
    state = fastdl.checkpoint.load("run/checkpoint.npz")

``save`` writes a temporary file beside the target, flushes it to disk and renames it over the
target (``os.replace``, atomic on POSIX): a process killed while writing leaves the previous
checkpoint whole, and a reader never sees half a file. Arrays keep their dtype and shape
bit for bit; the structure is JSON inside the archive (no pickle: loading runs no code).
"""

import json
import os

import numpy as np

from . import _validate

_STRUCTURE = "__structure__"


def save(path, state):
    """Write ``state`` to ``path`` atomically (see the module docstring); returns ``path``."""
    arrays = {}
    structure = json.dumps(_encode(state, arrays, "state"))
    directory = os.path.dirname(os.path.abspath(path))
    temporary = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as f:
            np.savez(f, **{_STRUCTURE: np.array(structure)}, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    descriptor = os.open(directory, os.O_RDONLY)
    try:  # the rename itself reaches the disk
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
    return path


def load(path):
    """The state :func:`save` wrote to ``path``. ValueError for a file that is no fastdl
    checkpoint (or a damaged one)."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            structure = json.loads(str(archive[_STRUCTURE]))
            arrays = {name: archive[name] for name in archive.files if name != _STRUCTURE}
    except (KeyError, ValueError, OSError, EOFError) as error:
        if isinstance(error, FileNotFoundError):
            raise
        raise ValueError(f"{path} is not a fastdl checkpoint (or is damaged): {error}") from None
    return _decode(structure, arrays)


def _encode(value, arrays, where):
    if isinstance(value, np.ndarray):
        name = f"a{len(arrays)}"
        arrays[name] = value
        return {"__array__": name}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise TypeError(f"{where}: checkpoint dicts need str keys; got "
                            f"{sorted(map(repr, value))}")
        return {"__dict__": {k: _encode(v, arrays, f"{where}[{k!r}]") for k, v in
                             value.items()}}
    if isinstance(value, (list, tuple)):
        return {"__list__": [_encode(v, arrays, f"{where}[{i}]") for i, v in enumerate(value)],
                "tuple": isinstance(value, tuple)}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"{where}: a checkpoint holds arrays, numbers, strings, None, lists and "
                    f"dicts; got {_validate.describe(value)}")


def _decode(value, arrays):
    if isinstance(value, dict):
        if "__array__" in value:
            return arrays[value["__array__"]]
        if "__dict__" in value:
            return {k: _decode(v, arrays) for k, v in value["__dict__"].items()}
        items = [_decode(v, arrays) for v in value["__list__"]]
        return tuple(items) if value["tuple"] else items
    return value
