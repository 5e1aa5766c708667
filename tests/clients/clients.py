"""Small versions of real torch.distributed clients, run unchanged but for the backend string.

Every function runs on one rank of a world started by ``multiproc.run_world`` (or torchrun) and
returns what the test compares between ``zmq`` and ``gloo``. Kept at module level: spawn re-imports
this module in each child.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

TIMEOUT = timedelta(seconds=120)


def plain(obj: Any) -> Any:
    """Tensors as numpy arrays, recursively: results cross the harness's queue by value (a tensor would be
    shared through file descriptors that die with the rank's process)."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        if hasattr(t, "full_tensor"):  # a DTensor: gathered (a collective, in the same order on every rank)
            t = t.full_tensor()
        return (t.float() if t.dtype == torch.bfloat16 else t).numpy().copy()
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    return obj


def _init(backend: str, rank: int, world: int) -> None:
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=TIMEOUT)


def _mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))


def _batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(8, 16, generator=g), torch.randn(8, 8, generator=g)


# ---- DDP ----------------------------------------------------------------------------------------
def ddp(rank: int, world: int, backend: str, steps: int = 3) -> list[torch.Tensor]:
    from torch.nn.parallel import DistributedDataParallel as DDP

    _init(backend, rank, world)
    try:
        model = DDP(_mlp(), bucket_cap_mb=0.001)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for step in range(steps):
            x, y = _batch(rank, step)
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
        return plain([p.detach().clone() for p in model.parameters()])
    finally:
        dist.destroy_process_group()


# ---- FSDP2 + DCP -----------------------------------------------------------------------------------
def fsdp2(rank: int, world: int, backend: str, ckpt_dir: str, steps: int = 3) -> dict[str, Any]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, set_model_state_dict,
                                                         get_optimizer_state_dict, set_optimizer_state_dict)
    from torch.distributed.fsdp import fully_shard

    _init(backend, rank, world)
    try:
        model = _mlp()
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer)
        fully_shard(model)
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
        for step in range(steps):
            x, y = _batch(rank, step)
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
        full = {k: v.detach().clone() for k, v in get_model_state_dict(model, options=StateDictOptions(full_state_dict=True)).items()}
        # DCP save / resume (the FSDP2 example's --dcp-api path).
        dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=ckpt_dir)
        fresh = _mlp(seed=1)
        for layer in fresh:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer)
        fully_shard(fresh)
        fresh_opt = torch.optim.Adam(fresh.parameters(), lr=0.01)
        state = {"model": get_model_state_dict(fresh), "optim": get_optimizer_state_dict(fresh, fresh_opt)}
        dcp.load(state, checkpoint_id=ckpt_dir)
        set_model_state_dict(fresh, state["model"])
        set_optimizer_state_dict(fresh, fresh_opt, state["optim"])
        resumed = {k: v.detach().clone() for k, v in get_model_state_dict(fresh, options=StateDictOptions(full_state_dict=True)).items()}
        # Full state on rank 0 only, broadcast to the shards of every rank.
        third = _mlp(seed=2)
        for layer in third:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer)
        fully_shard(third)
        third_opt = torch.optim.Adam(third.parameters(), lr=0.01)
        opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        sd = {k: v.clone() for k, v in full.items()} if rank == 0 else {}  # the loader may replace its values
        set_model_state_dict(third, sd, options=opts)
        full_optim = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True))
        set_optimizer_state_dict(third, third_opt, full_optim if rank == 0 else {}, options=opts)
        broadcast = {k: v.detach().clone() for k, v in get_model_state_dict(third, options=StateDictOptions(full_state_dict=True)).items()}
        return plain({"full": full, "resumed": resumed, "broadcast": broadcast, "devices": [d.type for d in dist.group.WORLD._device_types]})
    finally:
        dist.destroy_process_group()


# ---- FSDP1 sharded state dict ----------------------------------------------------------------------
def fsdp1_sharded(rank: int, world: int, backend: str) -> dict[str, torch.Tensor]:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP, StateDictType

    _init(backend, rank, world)
    try:
        model = FSDP(_mlp(), device_id=torch.device("cpu"), use_orig_params=True)
        x, y = _batch(rank, 0)
        torch.nn.functional.mse_loss(model(x), y).backward()
        with FSDP.state_dict_type(model, StateDictType.SHARDED_STATE_DICT):
            sd = model.state_dict()
        local = {k: v.local_tensor() if hasattr(v, "local_tensor") else v for k, v in sd.items()}  # ShardedTensor shards
        return plain({k: v.to_local() if hasattr(v, "to_local") else v for k, v in local.items()})
    finally:
        dist.destroy_process_group()


# ---- DTensor / tensor parallel ---------------------------------------------------------------------
def tensor_parallel(rank: int, world: int, backend: str) -> dict[str, torch.Tensor]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import distribute_tensor, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    _init(backend, rank, world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        model = parallelize_module(_mlp(), mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()})
        x, y = _batch(0, 0)  # TP: every rank sees the same batch
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        dt = distribute_tensor(torch.arange(16.0).reshape(4, 4), mesh, [Shard(0)])
        return plain({"loss": loss.detach(), "grad0": model[0].weight.grad.full_tensor(), "grad2": model[2].weight.grad.full_tensor(),
                "redistributed": dt.full_tensor(), "sum": dt.sum().full_tensor()})
    finally:
        dist.destroy_process_group()


# ---- functional collectives under torch.compile ----------------------------------------------------
def funcol_compile(rank: int, world: int, backend: str) -> dict[str, torch.Tensor]:
    import torch.distributed._functional_collectives as funcol

    _init(backend, rank, world)
    try:
        group = dist.group.WORLD

        def step(x: torch.Tensor) -> torch.Tensor:
            y = funcol.all_reduce(x * 2, "sum", group)
            z = funcol.all_gather_tensor(y + 1, 0, group)
            return funcol.reduce_scatter_tensor(z, "sum", 0, group) - 1

        x = torch.arange(4.0) + rank
        eager = step(x)
        compiled = torch.compile(step, backend="aot_eager", fullgraph=True)(x)
        return plain({"eager": eager, "compiled": compiled})
    finally:
        dist.destroy_process_group()


# ---- Lightning -------------------------------------------------------------------------------------
def lightning(rank: int, world: int, backend: str, root: str) -> list[torch.Tensor]:
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import DDPStrategy

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = _mlp()

        def training_step(self, batch: Any, _: int) -> torch.Tensor:
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    g = torch.Generator().manual_seed(7)
    data = torch.utils.data.TensorDataset(torch.randn(32, 16, generator=g), torch.randn(32, 8, generator=g))
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    module = Module()
    trainer = pl.Trainer(accelerator="cpu", devices=world, num_nodes=1, strategy=DDPStrategy(process_group_backend=backend, timeout=TIMEOUT),
                         max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=root)
    trainer.fit(module, loader)
    out = [p.detach().clone() for p in module.parameters()]
    if dist.is_initialized():
        dist.destroy_process_group()
    return plain(out)


# ---- accelerate ------------------------------------------------------------------------------------
def accelerate(rank: int, world: int, backend: str) -> list[torch.Tensor]:
    from accelerate import Accelerator

    # accelerate knows only its own backend names: create the group first, then it adopts it.
    _init(backend, rank, world)
    try:
        acc = Accelerator(cpu=True)
        model = _mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        model, opt = acc.prepare(model, opt)
        for step in range(3):
            x, y = _batch(rank, step)
            opt.zero_grad()
            acc.backward(torch.nn.functional.mse_loss(model(x), y))
            opt.step()
        gathered = acc.gather(torch.tensor([float(rank)]))
        return plain([p.detach().clone() for p in acc.unwrap_model(model).parameters()] + [gathered])
    finally:
        dist.destroy_process_group()


def backend_of_env() -> str:
    return os.environ.get("CLIENT_BACKEND", "zmq")
