"""Nested training state (optimizer, scheduler, RNG) as one safetensors file, with nothing pickled.

`torch.save` pickles, and unpickling a file someone else made can run any code. A state here is split in two: its
tensors go into the safetensors body, everything else (the nesting, numbers, strings, tuples, dicts with int keys,
numpy arrays of the RNG state) into one JSON document kept in the file's header metadata, where a tensor stands as
`{"__tensor__": name}`. Reading parses JSON and copies tensors: no code from the file runs. Only these types are
stored; anything else is a programming error (TypeError) when saving, so a state never half-round-trips.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

_META_KEY = "prefalign_state"
_MARKERS = ("__tensor__", "__tuple__", "__dict__", "__ndarray__")


class StateFileError(ValueError):
    """A state file that is not one of ours, or is damaged; the message says why in a few words."""


def save_state(obj: Any, path: str | Path) -> None:
    """Write `obj` (nested dicts, lists, tuples, scalars, strings, None, tensors, numpy arrays) to `path`."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _encode(obj, tensors, set())
    save_file(tensors, str(path), metadata={_META_KEY: json.dumps(skeleton)})


def load_state(path: str | Path) -> Any:
    """The object `save_state` wrote to `path`; StateFileError when the file is unreadable or not ours."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if _META_KEY not in meta:
                raise StateFileError("not a prefalign state file (no state in its header)")
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
        return _decode(json.loads(meta[_META_KEY]), tensors)
    except SafetensorError as e:
        raise StateFileError(f"not a readable safetensors file ({e})") from None
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise StateFileError(f"damaged state ({type(e).__name__}: {e})") from None


def _encode(obj: Any, tensors: dict[str, torch.Tensor], storages: set[int]) -> Any:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in storages and t.numel():  # safetensors refuses two names over one storage
            t = t.clone()
        storages.add(t.untyped_storage().data_ptr())
        name = f"t{len(tensors)}"
        tensors[name] = t
        return {"__tensor__": name}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors, storages) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, tensors, storages) for v in obj]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and k not in _MARKERS for k in obj):
            return {k: _encode(v, tensors, storages) for k, v in obj.items()}
        return {"__dict__": [[_encode(k, tensors, storages), _encode(v, tensors, storages)] for k, v in obj.items()]}
    raise TypeError(f"cannot store a {type(obj).__name__} in a state file")


def _decode(node: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(node, list):
        return [_decode(v, tensors) for v in node]
    if not isinstance(node, dict):
        return node
    if "__tensor__" in node:
        return tensors[node["__tensor__"]]
    if "__tuple__" in node:
        return tuple(_decode(v, tensors) for v in node["__tuple__"])
    if "__ndarray__" in node:
        return np.asarray(node["__ndarray__"], dtype=np.dtype(node["dtype"]))
    if "__dict__" in node:
        return {_hashable(_decode(k, tensors)): _decode(v, tensors) for k, v in node["__dict__"]}
    return {k: _decode(v, tensors) for k, v in node.items()}


def _hashable(key: Any) -> Any:
    if isinstance(key, (list, dict, torch.Tensor, np.ndarray)):
        raise TypeError(f"a {type(key).__name__} cannot be a dict key")
    return key
