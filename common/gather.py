"""The weights of a DeepSpeed ZeRO-3 model (each rank holds a shard of every weight), gathered one size-capped
bucket at a time: for the weight sync into a rollout engine (rollout/sync.py) and for saving (common/loop.py
full_weights), so no rank ever holds the whole model gathered. LoRA layers are merged inside the one gather of their
layer, and a gather is never nested in another (docs/PITFALLS.md#lora-in-the-sync).

- `unwrap(model)`: the module holding the weights (strips `.module` and peft wrappers).
- `hf_name(key)`: a peft-wrapped parameter name as the plain Hugging Face name (None for adapter tensors).
- `sharded_buckets(model, bucket_bytes)`: {HF name: tensor} dicts, one bucket at a time (a collective).

Generic torch code (peft is duck-typed, DeepSpeed imported inside the functions that need it).
"""

from __future__ import annotations

import torch


def unwrap(model):
    """The module that holds the weights: strips DDP/accelerate (`.module`) and peft (`get_base_model()`) wrappers.
    peft injects its LoRA layers into the base model in place, so the base model's forward still applies them."""
    model = getattr(model, "module", model)
    if hasattr(model, "peft_config") and hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def hf_name(key: str) -> str | None:
    """Map a peft-wrapped parameter name to the plain one; None for adapter-only tensors."""
    if ".lora_" in key or ".original_module." in key:
        return None
    key = key.replace(".base_layer.", ".")
    if ".modules_to_save." in key:  # "lm_head.modules_to_save.default.weight" -> "lm_head.weight"
        head, tail = key.split(".modules_to_save.", 1)
        key = head + "." + tail.split(".", 1)[1]
    return key


# ---------------------------------------------------------------------------------------------- sharded weights
DEFAULT_BUCKET_BYTES = 256 * 2**20  # gathered at once during a sync (plus at most one layer more)


def is_sharded(model) -> bool:
    """True for a model whose weights DeepSpeed ZeRO-3 has partitioned (each rank holds a shard)."""
    return any(hasattr(p, "ds_id") for p in unwrap(model).parameters())


def full_bytes(p: torch.Tensor) -> int:
    """Bytes of the whole weight (a ZeRO-3 parameter's own data is only this rank's shard)."""
    return getattr(p, "ds_numel", p.numel()) * p.element_size()


def is_lora_layer(module) -> bool:
    return hasattr(module, "base_layer") and hasattr(module, "get_delta_weight") and hasattr(module, "lora_A")


def gather_units(base) -> list[tuple[list[torch.nn.Parameter], object]]:
    """The model as units gathered whole: a LoRA layer (base weight, bias and adapter together, so the merge happens
    inside one gather) or one module's own weights. Each unit: (params, produce) where produce() -> {HF name:
    tensor} reads the gathered params (every alias of a tied weight named, e.g. lm_head.weight)."""
    names: dict[int, list[str]] = {}
    for n, p in base.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(n)
    units, seen, lora_prefixes = [], set(), []
    for mname, mod in base.named_modules():
        if any(mname.startswith(prefix + ".") for prefix in lora_prefixes):
            continue  # inside a LoRA layer: gathered with it
        if is_lora_layer(mod):
            lora_prefixes.append(mname)
            params = [p for p in mod.parameters() if id(p) not in seen]
            seen.update(id(p) for p in params)

            def produce(mod=mod, mname=mname):
                w = mod.base_layer.weight
                delta = sum((mod.get_delta_weight(a) for a in mod.active_adapters if a in mod.lora_A),
                            torch.zeros_like(w))
                out = {f"{mname}.weight": (w + delta.to(w.dtype)).detach()}  # merged, the shard never touched
                if getattr(mod.base_layer, "bias", None) is not None:
                    out[f"{mname}.bias"] = mod.base_layer.bias.detach()
                return out
            units.append((params, produce))
            continue
        own = [p for p in mod.parameters(recurse=False) if id(p) not in seen]
        if not own:
            continue
        seen.update(id(p) for p in own)

        def produce(own=own):
            out = {}
            for p in own:
                for n in names[id(p)]:
                    hf = hf_name(n)
                    if hf is not None:
                        out[hf] = p.detach()
            return out
        units.append((own, produce))
    return units


def sharded_buckets(model, bucket_bytes: int = DEFAULT_BUCKET_BYTES, stats: dict | None = None):
    """Yield the policy's weights as {HF name: tensor} dicts, one size-capped bucket at a time: the units
    (gather_units) of a bucket are gathered by ONE `deepspeed.zero.GatheredParameters` (never nested: a nested gather
    re-partitions early, docs/PITFALLS.md#lora-in-the-sync) and released when the consumer asks for the next bucket,
    so at most bucket_bytes + one unit are gathered at once. The yielded tensors are valid only until then: copy
    them. A model that is not ZeRO-3 partitioned passes through the same path (nothing to gather). A collective
    under ZeRO-3: every rank iterates to the end.

    stats (optional dict) gets: buckets, peak_gathered_bytes (measured inside each gather: the whole size of every
    non-persistent weight currently gathered, anywhere in the model), largest_unit_bytes, bucket_bytes."""
    import deepspeed

    base = unwrap(model)
    units = gather_units(base)
    every = [p for p in base.parameters() if hasattr(p, "ds_id") and not getattr(p, "ds_persist", False)]
    buckets, cur, size = [], [], 0
    for params, produce in units:
        b = sum(full_bytes(p) for p in params)
        if cur and size + b > bucket_bytes:
            buckets.append(cur)
            cur, size = [], 0
        cur.append((params, produce))
        size += b
    if cur:
        buckets.append(cur)
    peak = 0
    for bucket in buckets:
        params = [p for ps, _ in bucket for p in ps]
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None), torch.no_grad():
            from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

            peak = max(peak, sum(full_bytes(p) for p in every if p.ds_status == ZeroParamStatus.AVAILABLE))
            out = {}
            for _, produce in bucket:
                out.update(produce())
            yield out
    if stats is not None:
        stats.update(buckets=len(buckets), peak_gathered_bytes=peak, bucket_bytes=bucket_bytes,
                     largest_unit_bytes=max((sum(full_bytes(p) for p in ps) for ps, _ in units), default=0))
