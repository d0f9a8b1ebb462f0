"""torchrun / FSDP2 / DCP: everything that differs when training runs in N processes.

One process (no torchrun) is the degenerate case: every helper here is then a no-op, so the
training loop reads the same for 1 or N processes.
"""

from __future__ import annotations

import os
import pickle
from collections import Counter
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    """This process's place in the job. ``distributed`` is true under torchrun, even with one
    process (so ``torchrun --nproc_per_node=1`` exercises the FSDP2 path on one GPU)."""

    rank: int = 0
    size: int = 1
    device: torch.device = torch.device("cpu")
    distributed: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_world(device_name: str) -> World:
    """Join the torchrun process group when launched by torchrun (nccl on GPU, gloo on CPU)."""
    if device_name == "auto":
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        return World(device=torch.device(device_name))
    size, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device_name == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        # A bounded timeout: a rank that died makes the others fail instead of hanging.
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=timedelta(minutes=10))
    return World(rank=rank, size=size, device=device, distributed=True)


def close_world(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated decoder blocks (the classes transformers names in ``_no_split_modules``;
    also once FSDP2 has sharded them, as subclasses named ``FSDP<name>``)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    return [m for m in model.modules() if any(c.__name__ in names for c in type(m).__mro__)]


def untied_output_layer(model: torch.nn.Module) -> torch.nn.Module | None:
    """The output layer of ``model`` (PEFT-wrapped or not) when it holds parameters and its
    weight is not the input embedding's (tied, e.g. Qwen2-0.5B, GPT-2); else None."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    get_head = getattr(inner, "get_output_embeddings", None)
    head = get_head() if get_head is not None else None
    if head is None or not any(True for _ in head.parameters()):
        return None
    embedding = inner.get_input_embeddings()
    shared = {id(p) for p in embedding.parameters()} if embedding is not None else set()
    return None if any(id(p) in shared for p in head.parameters()) else head


def shard(model: torch.nn.Module, world: World, *, train: bool,
          param_dtype: torch.dtype | None = None,
          reduce_dtype: torch.dtype | None = None) -> torch.nn.Module:
    """FSDP2: shard each transformer block, an untied output layer, then the root (embeddings,
    final norm, a tied output layer). ``param_dtype`` (dtype=bfloat16,
    see ``preftune.precision``): the weights stay sharded as stored (float32 master weights)
    and are gathered as ``param_dtype`` copies for compute; ``reduce_dtype``: the dtype a
    trained model's gradients are reduce-scattered (and accumulated) in. The same on GPU and
    CPU."""
    if not world.distributed:
        return model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(world.device.type, (world.size,))
    kwargs = {"mesh": mesh}
    if param_dtype is not None or (train and reduce_dtype is not None):
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype,
                                                   reduce_dtype=reduce_dtype if train else None)
    blocks = transformer_blocks(model)
    if not blocks:
        raise ValueError(f"cannot find the transformer blocks of {type(model).__name__} to "
                         "shard (no _no_split_modules)")
    for block in blocks:
        fully_shard(block, **kwargs)
    head = untied_output_layer(model)
    if head is not None:
        # Its own unit: gathered only around its forward and backward (the chunked head runs
        # it through its hooks, preftune.fastpath), its gradient reduced as soon as backward
        # leaves it. Training: kept gathered from forward to its backward, which comes next.
        fully_shard(head, **{**kwargs, "reshard_after_forward": not train})
    fully_shard(model, **kwargs)
    return model


def reshard_all(model: torch.nn.Module) -> None:
    """Every FSDP2 unit of ``model`` back to its shards (the root stays gathered after a
    forward), so that its parameters are the sharded ones; a no-op for a plain model."""
    if not torch.distributed.is_available():
        return
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def gradient_sync(model: torch.nn.Module, world: World, enabled: bool) -> None:
    """Whether the next backward reduce-scatters ``model``'s gradients (FSDP2). Off, each
    process accumulates its unsharded gradients locally, so that accumulating micro-batches
    reduces once per optimizer step, with the last one. A no-op on one process."""
    if world.distributed and hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(enabled)


def sum_across(stats: Counter, world: World) -> Counter:
    """Sum every statistic over all ranks (float64, so counts stay exact)."""
    if not world.distributed:
        return stats
    keys = list(stats)  # the same insertion order on every rank: the same objective made them
    values = torch.tensor([float(stats[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(values)
    return Counter(dict(zip(keys, values.tolist(), strict=True)))


def share(items: list, world: World) -> list:
    """This rank's share of a global batch or eval set (strided, so sizes differ by <= 1)."""
    return items[world.rank :: world.size]


def grad_norm_value(norm: torch.Tensor) -> float:
    """clip_grad_norm_ returns a DTensor under FSDP2: materialise the global norm."""
    full = getattr(norm, "full_tensor", None)
    return float(full() if full is not None else norm)


def full_state_dict(model: torch.nn.Module, world: World) -> dict[str, torch.Tensor]:
    """The whole model's weights on CPU, gathered on rank 0 (empty on other ranks)."""
    if not world.distributed:
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    weights = get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # Gathering copies each name apart: a tied weight (embedding and output layer) comes back
    # as two tensors, and an export would store it twice. Share them again, as an unsharded
    # model's state dict does.
    first: dict[int, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        kept = first.setdefault(id(param), name)
        if kept != name and name in weights and kept in weights:
            weights[name] = weights[kept]
    return weights


def save_sharded(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Model and optimizer state as a DCP checkpoint: each rank writes its shards."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=folder)


def load_sharded(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load a DCP checkpoint written by any number of processes into this layout.

    Nothing in it is unpickled freely: the metadata goes through :func:`read_dcp_metadata` and
    the non-tensor values (optimizer hyperparameters) through ``torch.load(weights_only=True)``.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optimizer": optim_sd}
    dcp.load(state, storage_reader=_safe_reader(folder), planner=_safe_planner())
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optimizer"])


# The globals a DCP ``.metadata`` pickle may name (torch 2.x); anything else is refused.
_DCP_METADATA = "torch.distributed.checkpoint.metadata"
_METADATA_GLOBALS = {
    (_DCP_METADATA, name) for name in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")
} | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
     ("torch.serialization", "_get_layout"), ("torch", "Size"),
     ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"),
     ("pathlib", "PureWindowsPath"), ("collections", "OrderedDict")}


class _MetadataUnpickler(pickle.Unpickler):
    """Rebuilds DCP metadata (dataclasses, sizes, dtypes, paths) and nothing else: a pickle that
    names any other global (``os.system``, ``builtins.eval``, ...) fails before it is called."""

    def find_class(self, module: str, name: str):
        if (module, name) in _METADATA_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def read_dcp_metadata(folder: Path):
    """The ``.metadata`` of a DCP checkpoint, read by the restricted unpickler.

    Raises ``pickle.UnpicklingError`` (or ``OSError``, ``EOFError``) when it is not DCP metadata.
    """
    from torch.distributed.checkpoint.metadata import Metadata

    with open(Path(folder) / ".metadata", "rb") as f:
        metadata = _MetadataUnpickler(f).load()
    if not isinstance(metadata, Metadata):
        raise pickle.UnpicklingError(f"holds a {type(metadata).__name__}, not DCP metadata")
    return metadata


def _safe_reader(folder: Path):
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            metadata = read_dcp_metadata(self.path)
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(folder)


def _safe_planner():
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint._traverse import set_element

    class SafePlanner(DefaultLoadPlanner):
        """DefaultLoadPlanner unpickles non-tensor values with ``weights_only=False``."""

        def load_bytes(self, read_item, value) -> None:
            loaded = torch.load(value, weights_only=True)
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn],
                            loaded)
            else:
                self.state_dict[read_item.dest_index.fqn] = loaded

    return SafePlanner()


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()
