"""Several processes, one result: the thin layer over accelerate that capture, evaluate, layer_profile and
train_lora use under ``accelerate launch`` (or torchrun).

Every process runs the same call and plans the same batches; each then runs its share of them (`share`:
accelerate's ``split_between_processes`` contiguous shares, for capture's shards; evaluate and layer_profile
deal every world-th batch, since their batches are sorted by length), and results are gathered as tensors,
so that each process returns exactly what one process would. Nothing here
pickles: object collectives are avoided; what crosses processes is tensors (and files in a shared cache
folder). With one process every function is a no-op.
"""

from __future__ import annotations

import math
import os

import torch
from torch import Tensor


def rank_and_world() -> tuple[int, int]:
    """(process index, number of processes); starts the process group through accelerate's `PartialState`
    under ``accelerate launch`` / torchrun (NCCL on GPUs, gloo on CPUs)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState

        state = PartialState()
        if state.num_processes > 1:
            return state.process_index, state.num_processes
        if not dist.is_initialized():  # torchrun on CPUs without an accelerate config: join the group ourselves
            dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def world() -> int:
    return rank_and_world()[1]


def is_main() -> bool:
    return rank_and_world()[0] == 0


def share(n: int, rank: int | None = None, world_size: int | None = None) -> range:
    """This process's contiguous share of ``range(n)`` (accelerate's ``split_between_processes`` rule)."""
    if rank is None or world_size is None:
        rank, world_size = rank_and_world()
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


def barrier() -> None:
    if world() > 1:
        import torch.distributed as dist

        dist.barrier()


def _device() -> torch.device:
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(tensors: list[Tensor]) -> None:
    """Sum each tensor over processes, in place, in one collective (float32 on the wire)."""
    if world() == 1 or not tensors:
        return
    import torch.distributed as dist

    dev = _device()
    flat = torch.cat([t.reshape(-1).to(dev, torch.float32) for t in tensors])
    dist.all_reduce(flat)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def gather_rows(rows: Tensor) -> Tensor:
    """Concatenate every process's ``rows`` (``[n_i, ...]``, same trailing shape and dtype) in process order.

    Shares may differ in length: they are padded to the longest for the collective and trimmed after.
    The result is on ``rows``' device and bitwise the rows each process sent."""
    if world() == 1:
        return rows
    import torch.distributed as dist

    dev = _device()
    n = torch.tensor([rows.shape[0]], device=dev)
    counts = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, n)
    counts_i = [int(c) for c in counts]
    longest = max(counts_i)
    # gloo has no all_gather for some dtypes (bool, bfloat16 on older builds): move bytes, not values
    width = _row_bytes(rows)
    padded = torch.zeros(longest, width, dtype=torch.uint8, device=dev)
    if rows.shape[0] and width:
        padded[:rows.shape[0]] = rows.contiguous().reshape(rows.shape[0], -1).view(torch.uint8).to(dev)
    parts = [torch.zeros_like(padded) for _ in counts_i]
    dist.all_gather(parts, padded)
    total = sum(counts_i)
    if not width:
        return torch.empty(total, *rows.shape[1:], dtype=rows.dtype, device=rows.device)
    out = torch.cat([p[:c] for p, c in zip(parts, counts_i, strict=True)]).to(rows.device)
    return out.view(rows.dtype).reshape(total, *rows.shape[1:])


def _row_bytes(rows: Tensor) -> int:
    return math.prod(rows.shape[1:]) * rows.element_size()


def broadcast_ints(values: list[int] | None, n: int | None = None) -> list[int]:
    """The main process's list of ints on every process (``values`` is ignored elsewhere). ``n``: the length,
    when every process knows it; otherwise the length is broadcast first."""
    if world() == 1:
        return list(values or [])
    import torch.distributed as dist

    dev = _device()
    if n is None:
        size = torch.tensor([len(values or []) if is_main() else 0], device=dev)
        dist.broadcast(size, 0)
        n = int(size)
    t = torch.tensor(list(values) if is_main() else [0] * n, dtype=torch.int64, device=dev).reshape(n)
    dist.broadcast(t, 0)
    return [int(v) for v in t.tolist()]
