"""Stage 2 over several GPUs: the recipe, data-parallel, with the weights it trains sharded by PyTorch's FSDP2.

    accelerate launch --config_file $(python -c "import tokenbooth.assets as a; print(a.ACCELERATE_FSDP)") \
        -m tokenbooth train --model lumina-mgpt-7b-768 --images dog/ --class-name dog --output out/dog

`accelerate launch` starts one process per GPU and sets up the process group (its config, shipped in
assets/accelerate/fsdp.yaml, says how many and how FSDP reshards); `torch.distributed.fsdp.fully_shard`
(FSDP2) shards each Linear layer stage 2 trains (Q/K/V of every attention block): its fp32 master weight, its
gradient and AdamW's two moments live 1/N on each of the N processes, which for Lumina-mGPT 7B's full Q/K/V
is 26 GB of the 40 GB a single GPU would hold. The frozen rest of the model (bf16, never updated) is replicated.
accelerate's own `prepare` is not used: it would also shard the model's root, whose output layer the backbone
reads directly (`image_head` takes its image rows).

Each process draws the same batch (same seed) and trains on its 1/N of the pairs; FSDP averages the sharded
gradients across processes and [V]'s gradient is averaged by hand, so a step is the single-process step on
the whole batch. Checkpoints hold whole tensors, written by the first process, in the single-process format:
a sharded run resumes sharded or not.
"""

from __future__ import annotations

import atexit
import os
import time

import torch

from ..errors import UserError

# accelerate and torch.distributed's submodules are imported in the functions that use them: torch.distributed.tensor
# alone takes seconds to import, and most runs are not sharded (the first call pays, once).

GLOO_SETTLE_SECONDS = 0.2  # per barrier at exit; see Sharding._close


class Sharding:
    """This process's place among the `world` processes of a sharded run."""

    def __init__(self):
        import torch.distributed as dist
        from accelerate import PartialState
        from torch.distributed.device_mesh import init_device_mesh

        state = PartialState(cpu=not torch.cuda.is_available())  # gloo on CPUs (the tests), nccl on GPUs
        self.rank, self.world = state.process_index, state.num_processes
        self.device = state.device
        self.mesh = init_device_mesh(self.device.type, (self.world,))
        self.dist = dist
        # accelerate's config: FULL_SHARD frees a layer's gathered weights after its forward pass
        self.reshard = os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() != "false"
        atexit.register(self._close)

    def _close(self) -> None:
        """Ends the process group at exit, while the interpreter is whole. On gloo (CPUs) each collective's
        work object is let go by one of gloo's worker threads after the caller has moved on; letting go of
        its tensors takes the GIL, and a worker still at it once the interpreter finalizes aborts the
        process ("terminate called without an active exception"). So the processes meet, the workers get
        time with the GIL released to drop what they hold, and a last barrier, which has nothing in flight
        to hold, goes before the group does."""
        if not self.dist.is_initialized():
            return
        if self.dist.get_backend() == "gloo":
            for _ in range(2):
                self.dist.barrier()
                time.sleep(GLOO_SETTLE_SECONDS)
        self.dist.destroy_process_group()

    @staticmethod
    def from_environment() -> "Sharding | None":
        """A Sharding when this process is one of several (accelerate launch, torchrun), else None."""
        return Sharding() if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        self.dist.barrier()

    def check(self, batch_size: int, accumulation: int) -> None:
        if batch_size % (self.world * accumulation):
            raise UserError(f"--batch-size {batch_size} must split evenly over {self.world} processes x "
                            f"{accumulation} micro-batches")

    def local(self, ids: torch.Tensor, labels: torch.Tensor):
        """This process's share of a batch every process drew alike."""
        n = ids.shape[0] // self.world
        return ids[self.rank * n:(self.rank + 1) * n], labels[self.rank * n:(self.rank + 1) * n]

    def shard(self, backbone, layer_params: dict) -> dict:
        """Shards the modules owning the trained weights; returns the weights under their names again (FSDP
        gives each module new, sharded parameters)."""
        from torch.distributed.fsdp import fully_shard

        owners = {name.rsplit(".", 1)[0] for name in layer_params}
        modules = dict(backbone.model.named_modules())
        for owner in sorted(owners):
            module = modules[owner]
            if not isinstance(module, torch.nn.Linear) or any(not p.requires_grad for p in module.parameters()):
                raise UserError(f"a sharded run trains whole Linear layers (--layers qkv); {owner} is not one")
            fully_shard(module, mesh=self.mesh, reshard_after_forward=self.reshard)
        named = dict(backbone.model.named_parameters())
        return {name: named[name] for name in layer_params}

    def average(self, grad: torch.Tensor | None) -> None:
        """A replicated parameter's gradient ([V]'s), averaged over the processes in place."""
        if grad is not None:
            self.dist.all_reduce(grad, op=self.dist.ReduceOp.SUM)
            grad.div_(self.world)


def full(tensor: torch.Tensor) -> torch.Tensor:
    """A whole tensor from a sharded one (a collective: every process calls it); others as they are."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def like(tensor: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """A whole tensor laid out as `reference` (sharded the same way if it is sharded)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(reference, DTensor):
        # Every process holds the same whole tensor (read from one checkpoint), so each keeps its own shard:
        # no scatter from the first process is needed.
        return distribute_tensor(tensor.to(reference.device, reference.dtype), reference.device_mesh,
                                 reference.placements, src_data_rank=None)
    return tensor


def clip_gradients(params: list, max_norm: float) -> None:
    """torch's clip_grad_norm_, for gradients some of which are sharded (their norms are all-reduced)."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    if not any(isinstance(g, DTensor) for g in grads):
        torch.nn.utils.clip_grad_norm_(params, max_norm)
        return
    norms = [full(torch.linalg.vector_norm(g)) for g in grads]
    total = torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]))
    scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in grads:
        g.mul_(scale.item())


def whole_optimizer_state(optimizer) -> dict:
    """The optimizer's state dict with sharded entries made whole (a collective), for a checkpoint that does
    not depend on how many processes wrote it."""
    state = optimizer.state_dict()
    state["state"] = {k: {name: full(v) if isinstance(v, torch.Tensor) else v for name, v in s.items()}
                      for k, s in state["state"].items()}
    return state


def load_optimizer(optimizer, saved: dict) -> None:
    """Loads a whole saved state into an optimizer whose parameters may be sharded."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = {k: {name: like(v, params[int(k)]) if isinstance(v, torch.Tensor) and v.dim() > 0 else v
                 for name, v in s.items()} for k, s in saved["state"].items()}
    optimizer.load_state_dict({**saved, "state": state})
