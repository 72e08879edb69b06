"""Process group, device and parallelism, applied to the model from outside (torchtitan's way).

One process: nothing is wrapped. Under `torchrun --nproc-per-node N`: DDP or FSDP2
(`fully_shard` on a 1-D DeviceMesh). NCCL on GPUs, gloo on CPUs, so the same code is tested
with 2 CPU ranks in CI.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from lmforge.errors import UserError


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def is_main_rank() -> bool:
    """Rank 0 under torchrun, or a lone process: the one that prints and writes what all ranks computed alike."""
    return int(os.environ.get("RANK", "0")) == 0


def setup(device: str = "auto") -> DistEnv:
    """Pick the device and, under torchrun (WORLD_SIZE > 1), join the process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device not in ("auto", "cpu", "cuda"):
        raise UserError(f"train.device must be auto, cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device is cuda but no CUDA device is available")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=dev if use_cuda else None)
    return DistEnv(rank, world, local_rank, dev)


_joined = False  # whether this process ever joined a process group (see exit_after_process_group)


def teardown() -> None:
    global _joined
    if dist.is_initialized():
        _joined = True
        # Without it a rank may tear down gloo while its peer still finishes its last collective.
        dist.barrier()
        dist.destroy_process_group()


def exit_after_process_group(code: int) -> None:
    """End a process that used a process group without Python's interpreter teardown. Gloo's worker threads can
    still hold work objects whose tensors are freed during finalization, which aborts the process with "terminate
    called without an active exception" after a successful run (about 1 in 10 two-rank FSDP2 runs here, even after
    destroy_process_group; pytorch/pytorch#179291). Outputs are flushed first; lmforge registers no atexit work."""
    if not _joined:
        return
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def resolve_mode(parallel: str, world: int) -> str:
    if parallel not in ("auto", "ddp", "fsdp", "none"):
        raise UserError(f"train.parallel must be auto, ddp, fsdp or none, got {parallel!r}")
    if world == 1:
        return "none"
    if parallel == "none":
        raise UserError(f"train.parallel is none but {world} processes were launched")
    return "ddp" if parallel == "auto" else parallel


def parallelize(model: nn.Module, mode: str, env: DistEnv, param_dtype: torch.dtype | None = None) -> nn.Module:
    """Wrap `model` for data parallelism. FSDP2 shards each block on its own, then the root, so
    the root group holds the embeddings AND the LM head: tied weights stay in one group."""
    if mode == "none":
        return model
    if mode == "ddp":
        ids = [env.local_rank] if env.device.type == "cuda" else None
        # A model that runs only part of itself per batch (multi-task: one task's branch) leaves the other parts
        # without gradients, which DDP must be told to expect.
        partial = getattr(model, "runs_part_per_batch", False)
        return nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=partial)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(env.device.type, (env.world,))
    # bf16 compute with fp32 gradient reduction on GPU; plain fp32 otherwise.
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for block in model.layers:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Average a scalar tensor over ranks (identity in one process)."""
    if dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.AVG if dist.get_backend() == "nccl" else dist.ReduceOp.SUM)
        if dist.get_backend() != "nccl":  # gloo has no AVG
            value /= dist.get_world_size()
    return value


def all_reduce_max(value: torch.Tensor) -> torch.Tensor:
    """The largest value of a scalar tensor over ranks (identity in one process)."""
    if dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value


def gather_cpu(value: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's tensor (CPU), in rank order: [value] in one process."""
    if not dist.is_initialized():
        return [value]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def all_reduce_grads(params) -> None:
    """Average the gradients of parameters that no wrapper syncs (an objective's own) over ranks."""
    if dist.is_initialized():
        for p in params:
            if p.grad is not None:
                p.grad.copy_(all_reduce_mean(p.grad))


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
