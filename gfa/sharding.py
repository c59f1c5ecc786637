"""
Sharded data parallelism for train.py (parallel='fsdp'): PyTorch's FSDP2 (fully_shard) keeps
1/world of the parameters, gradients and optimizer state on each rank, as the paper trained
(1D, fully sharded), where DDP keeps all of them on every GPU.

    torchrun --nproc_per_node=8 train.py config/cascade_a2.py --parallel=fsdp
    python train.py config/demo.py --parallel=fsdp          # one process: a process group of one

shard() wraps each block (after checkpoint_blocks() when activation checkpointing is on: then
torch.compile, then fully_shard, the order torchtitan uses, so the compiled graphs hold no
collectives), then the root (embedding, final norm, head). With dtype=bfloat16 the blocks'
parameters are gathered in bf16 and gradients reduced in fp32 (MixedPrecisionPolicy); the root,
the sharded master weights and the optimizer state stay fp32, and so does the residual stream,
as under DDP's autocast. Every rank initialises the whole model from the seed (the same weights
as one process or DDP) on the CPU, and fully_shard moves only its own shards to the GPU.

The gradient-norm dump and norm equalisation work on the sharded gradients: gfa.training sums
the squares of each rank's shards and all-reduces them, one collective and no host sync, so the
numbers equal DDP's. Checkpoints go through torch.distributed.checkpoint (gfa.rundir documents
the files); a resume may use another number of ranks (DCP reshards), and fanin.py / prune.py
read the weights of a sharded checkpoint as they read a plain one.
"""
import uuid
from dataclasses import replace

import torch
import torch.distributed as dist

from gfa import rundir
from gfa.cli import UserError
from gfa.training import on_master, setup_distributed

MODES = ("ddp", "fsdp")


def check(parallel):
    if parallel not in MODES:
        raise UserError(f"parallel={parallel!r}: use 'ddp' (every rank holds the whole model) or 'fsdp' (sharded)")


def setup(parallel, device):
    """gfa.training.setup_distributed(device), and for 'fsdp' a process group of one when the script
    runs without torchrun (FSDP needs a group); the Dist it returns has sharded=True."""
    d = setup_distributed(device)
    if parallel != "fsdp":
        return d
    if not dist.is_initialized():
        dist.init_process_group("nccl" if d.device_type == "cuda" else "gloo", store=dist.HashStore(),
                                rank=0, world_size=1)
    return replace(d, ddp=True, sharded=True)


def checkpoint_blocks(model):
    """Activation checkpointing per block (any parallel mode): each block keeps only its input and
    recomputes the rest in backward. The wrapper leaves state-dict names as they were."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    for i, block in enumerate(model.blocks):
        model.blocks[i] = checkpoint_wrapper(block)
    return model


def shard(model, d, dtype, compile):
    """FSDP2 over model in place (a GPT on the CPU; fully_shard moves each rank's shards to d.device),
    after any checkpoint_blocks(). Blocks are replaced by their wrappers; state dicts through
    get_state_dict() keep the plain names."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mesh = init_device_mesh(d.device_type, (d.world,))
    bf16 = dtype == "bfloat16"
    # bf16: the blocks' parameters gathered in bf16 (autocast would cast them for their matmuls anyway),
    # gradients reduced in fp32; inputs left as they are, so the residual stream and RoPE tables stay fp32
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None,
                                  reduce_dtype=torch.float32 if bf16 else None, cast_forward_inputs=False)
    if compile:   # a graph per distinct block shape (a tapered model: one per layer), in train and in eval mode
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 2 * len(model.blocks) + 8)
    for i, block in enumerate(model.blocks):
        if compile:
            block = torch.compile(block, fullgraph=True)
        # a repeated block (virtual depth) stays gathered between its repeats
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=model.repeats[i] == 1)
        model.blocks[i] = block
    fully_shard(model, mesh=mesh)   # the root: embedding, final norm, head in fp32, as under autocast
    return model


def state(model, optimizer):
    """{'model', 'optimizer'}: this rank's shards as DTensors, keyed by the plain parameter names."""
    from torch.distributed.checkpoint.state_dict import get_state_dict
    msd, osd = get_state_dict(model, optimizer)
    return {"model": msd, "optimizer": osd}


def save(run, d, model, optimizer, train_config, iter_num, **extra):
    """A sharded checkpoint (collective: every rank calls it): each rank writes its shards, then
    rank 0 commits them by writing ckpt.pt; a failure is a UserError on every rank."""
    box = [uuid.uuid4().hex]
    dist.broadcast_object_list(box, src=0)   # one folder name for all ranks
    rundir.write_shards(run, box[0], state(model, optimizer))
    on_master(d, lambda: rundir.save_checkpoint(run, "gpt", None, train_config, iter_num, sharded=box[0], **extra))


def load(run, ckpt, model, optimizer):
    """Resume: this rank's shards of model and optimizer from a sharded checkpoint, written by any
    number of ranks (collective)."""
    from torch.distributed.checkpoint.state_dict import set_state_dict
    sd = state(model, optimizer)   # the shapes to fill (it also creates the optimizer's state)
    rundir.read_shards(run, ckpt, sd)
    set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optimizer"])
