"""One rank of a torch.distributed (gloo) job: a DistributedDataParallel model with
fastdl.torch.SyncBatchNorm trains a few SGD steps on its rows of each global batch; rank 0
saves the parameters and running statistics. Arguments: rank, world, port, output file."""

import os
import sys

import numpy as np
import torch
import torch.distributed as dist

import fastdl.torch as fdt
from fastdl import distributed

from torch_model import STEPS, batches, model

rank, world, port, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                        world_size=world)
try:  # PyTorch's own SyncBatchNorm, on the CPU
    torch.nn.SyncBatchNorm(4)(torch.randn(6, 4))
    raise AssertionError("torch.nn.SyncBatchNorm ran on the CPU: the test's premise is gone")
except ValueError as error:
    assert "GPU" in str(error) or "cuda" in str(error).lower(), error
net = fdt.SyncBatchNorm.convert_sync_batchnorm(model())
ddp = torch.nn.parallel.DistributedDataParallel(net)
opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
for X, y in batches()[:STEPS]:
    lo, hi = distributed.rank_rows(len(y), rank, world)
    opt.zero_grad()
    torch.nn.functional.cross_entropy(ddp(X[lo:hi]), y[lo:hi]).backward()
    opt.step()
if rank == 0:
    state = {k: v.detach().numpy() for k, v in net.state_dict().items()}
    np.savez(out, **state)
dist.barrier()
# Both ranks are done: leave without tearing gloo down, whose teardown at exit ended a rank
# with "terminate called without an active exception" (SIGABRT) once in a loaded CI run.
os._exit(0)
