"""Training state without pickle: tensors in safetensors files, everything else in one JSON file.

A run folder is read back on every resume, and resume is automatic, so nothing in it may be able to run code when
loaded: `torch.load(weights_only=False)` (pickle) on a planted file would. Here the state is a tree of dicts, lists,
tuples, str/int/float/bool/None, torch tensors and NumPy arrays (the RNG state); the JSON file holds the tree with
each tensor replaced by a reference into `<name>.safetensors` (sharded past `max_shard_bytes`). Reading parses
JSON and safetensors only. Round trips are exact: tensors bit for bit, floats through `repr` (NaN and inf
included), int keys and tuples tagged.

DeepSpeed's own shard files are pickles that its engine reads with torch.load; `safe_torch_load` reads them with
`weights_only=True` and an explicit allow-list of the few DeepSpeed classes they hold (see common/loop.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

STATE_JSON = "state.json"
_T, _TUPLE, _DICT, _ND = "__tensor__", "__tuple__", "__dict__", "__ndarray__"


class UnsafeStateError(ValueError):
    """A state file is not in the expected pickle-free format (or not readable as such); nothing was executed."""


def _encode(obj: Any, tensors: list[torch.Tensor], where: str) -> Any:
    if isinstance(obj, torch.Tensor):
        tensors.append(obj)
        return {_T: len(tensors) - 1}
    if isinstance(obj, np.ndarray):
        return {_ND: obj.tolist(), "dtype": str(obj.dtype), "shape": list(obj.shape)}
    if isinstance(obj, (np.integer, np.floating, np.bool_)):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, tuple):
        return {_TUPLE: [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, tensors, f"{where}.{k}") for k, v in obj.items()}
        return {_DICT: [[_encode(k, tensors, where), _encode(v, tensors, f"{where}[{k!r}]")] for k, v in obj.items()]}
    raise TypeError(f"{where}: cannot store a {type(obj).__name__} in a pickle-free state file")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if _T in obj:
        return tensors[f"t{obj[_T]}"]
    if _TUPLE in obj:
        return tuple(_decode(v, tensors) for v in obj[_TUPLE])
    if _DICT in obj:
        return {_hashable(_decode(k, tensors)): _decode(v, tensors) for k, v in obj[_DICT]}
    if _ND in obj:
        return np.asarray(obj[_ND], dtype=np.dtype(obj["dtype"])).reshape(obj["shape"])
    return {k: _decode(v, tensors) for k, v in obj.items()}


def _hashable(k: Any) -> Any:
    return tuple(_hashable(v) for v in k) if isinstance(k, list) else k


def _writable(t: torch.Tensor, storages: set) -> torch.Tensor:
    """t as safetensors writes it: on the CPU, contiguous, not sharing storage with another tensor of the shard.
    Copied only where one of these fails: a copy of every tensor would double the optimizer state's memory for the
    length of the save (2 x 78 MB for a reward model's embedding moments, gigabytes at 7B)."""
    t = t.detach()
    if t.device.type != "cpu" or not t.is_contiguous() or t.untyped_storage().data_ptr() in storages:
        t = t.to("cpu", copy=True).contiguous()
    storages.add(t.untyped_storage().data_ptr())
    return t


def save_state(folder: str | Path, obj: Any, name: str = "state", max_shard_bytes: int = 2 * 1024**3) -> None:
    """Write `obj` as `<name>.json` + `<name>.safetensors` (or `<name>-00001-of-0000N.safetensors`) in `folder`.
    Tensors are copied to the CPU one shard at a time; CPU tensors are written in place (see `_writable`)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    tensors: list[torch.Tensor] = []
    tree = _encode(obj, tensors, name)
    shards, cur, size = [], [], 0
    for i, t in enumerate(tensors):
        n = t.numel() * t.element_size()
        if cur and size + n > max_shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append(i)
        size += n
    shards.append(cur)
    files = [f"{name}.safetensors"] if len(shards) == 1 else \
        [f"{name}-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    where = {}
    for fname, idx in zip(files, shards):
        part, storages = {}, set()
        for i in idx:
            part[f"t{i}"] = _writable(tensors[i], storages)
        save_file(part, str(folder / fname), metadata={"format": "pt"})
        where.update({f"t{i}": fname for i in idx})
        del part
    doc = {"format": "qwen-align state 1", "files": files, "tree": tree}
    (folder / f"{name}.json").write_text(json.dumps(doc, allow_nan=True) + "\n", encoding="utf-8")


def load_state(folder: str | Path, name: str = "state") -> Any:
    """Read what `save_state` wrote; JSON and safetensors parsers only. A missing, damaged or foreign file raises
    UnsafeStateError naming it."""
    from safetensors.torch import load_file

    folder = Path(folder)
    path = folder / f"{name}.json"
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UnsafeStateError(f"{path}: missing") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UnsafeStateError(f"{path}: not a JSON state file ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != "qwen-align state 1" or not isinstance(doc.get("files"), list):
        raise UnsafeStateError(f"{path}: not a qwen-align state file")
    tensors: dict[str, torch.Tensor] = {}
    for fname in doc["files"]:
        f = folder / str(fname)
        if Path(str(fname)).name != fname or not f.is_file():
            raise UnsafeStateError(f"{path}: names a tensor file {fname!r} that is not in {folder}")
        try:
            tensors |= load_file(str(f))
        except Exception as e:  # safetensors raises its own error type for a damaged header
            raise UnsafeStateError(f"{f}: not a readable safetensors file ({e})") from None
    try:
        return _decode(doc["tree"], tensors)
    except (KeyError, TypeError, ValueError) as e:
        raise UnsafeStateError(f"{path}: damaged state tree ({e!r})") from None


# ----------------------------------------------------------------------------------------------------------------
# DeepSpeed's shard files (torch.save pickles written by its engine): weights_only loading with an allow-list.

def _deepspeed_safe_globals() -> list:
    """The non-tensor classes DeepSpeed 0.19 puts in ZeRO-2/3 checkpoints of our trainers (found with
    torch.serialization.get_unsafe_globals_in_checkpoint on saved shards). Anything else is refused."""
    import deepspeed.runtime.fp16.loss_scaler as ls
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    found = [ZeroStageEnum, fragment_address]
    found += [getattr(ls, n) for n in ("LossScaler", "DynamicLossScaler") if hasattr(ls, n)]
    return found


def safe_torch_load(path: str | Path, map_location=None) -> Any:
    """torch.load with weights_only=True plus the DeepSpeed allow-list. A file that needs any other global (a
    planted payload, say) raises UnsafeStateError before anything in it runs."""
    import pickle

    try:
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, EOFError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UnsafeStateError(f"{path}: refused to load (only tensors and DeepSpeed's own state are read, never "
                               f"arbitrary pickled objects): {first}") from None
