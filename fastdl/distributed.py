"""Data-parallel training over MPI (SPEC.md, "Data-parallel training"): W processes train one
model, each on its share of every global mini-batch, and end every step with the same bits.

    from fastdl import distributed as dist
    dist.init()                                     # MPI.COMM_WORLD (mpi4py, the mpi extra)
    dist.broadcast_parameters(model.params())       # rank 0's initial parameters everywhere
    for X, y in fd.data.minibatches(X_train, y_train, 256, seed=epoch,
                                    rank=dist.rank(), world=dist.world_size()):
        ...                                         # the rank's rows of each global batch
        loss = loss_fn.forward(model.forward(X), y) # reduction="sum"
        model.backward(loss_fn.backward(1 / dist.global_denominator(len(y))))
        dist.allreduce(model.flat_grads)            # the full gradient, on every rank
        opt.step(model.grads())
    dist.print0(f"epoch {epoch}: ...")              # rank 0 alone prints

The global mini-batch of B rows (the same permutation on every rank) is split in rank order:
rank r takes rows floor(r * B / W) to floor((r + 1) * B / W) (:func:`rank_rows`; a rank may
get none). Every rank divides its rows' summed loss by the global denominator (the rows not
ignored across all ranks, or their total class weight), so each rank's gradients are its share
of the global gradient and one SUM-allreduce of the flat gradient buffer gives the full one.
Sums are reduced in a fixed order (to rank 0, then broadcast), so every rank gets the same
bits whatever W.

Batch norm synchronized across ranks is ``nn.BatchNorm(..., sync=True)``; dropout masks keyed
by the global position of each element are ``nn.Dropout``'s ``batch=`` (the rows' offset in
the global batch).
"""

import os
import socket
import sys
import threading
import time

import numpy as np

from . import _validate

_COMM = None  # the communicator of init(), a Communicator


class Communicator:
    """An mpi4py communicator with the few collective operations data-parallel training needs;
    every reduction gives the same bits on every rank."""

    def __init__(self, comm):
        from mpi4py import MPI

        self.comm, self._mpi = comm, MPI
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        # (host, pid) of every rank: to say which rank a message is about
        self.processes = comm.allgather((socket.gethostname(), os.getpid()))

    def describe(self):
        """"rank 0: host pid 123, rank 1: ...": what MPI's messages (host, PID) map to."""
        return ", ".join(f"rank {r}: {host} pid {pid}"
                         for r, (host, pid) in enumerate(self.processes))

    def absent(self):
        """{rank: "gone" | "stopped"} for the other ranks on this host whose process has ended
        or is stopped (a rank on another host cannot be checked from here)."""
        here = socket.gethostname()
        states = {r: _process_state(pid) for r, (host, pid) in enumerate(self.processes)
                  if host == here and r != self.rank}
        return {r: state for r, state in states.items() if state != "running"}

    def allreduce(self, array):
        """``array`` (a C-contiguous float or int NumPy array) summed over the ranks, in place.

        Two ranks add a + b (commutative: the same bits on both); more reduce to rank 0 in
        MPI's fixed order and broadcast the result, so that no rank adds in another order."""
        _check_buffer(array, "array")
        if self.size == 1:
            return array
        if self.size == 2:
            self.comm.Allreduce(self._mpi.IN_PLACE, array, op=self._mpi.SUM)
            return array
        if self.rank == 0:
            self.comm.Reduce(self._mpi.IN_PLACE, array, op=self._mpi.SUM, root=0)
        else:
            self.comm.Reduce(array, None, op=self._mpi.SUM, root=0)
        self.comm.Bcast(array, root=0)
        return array

    def broadcast(self, arrays, root=0):
        """Copy rank ``root``'s ``arrays`` (C-contiguous NumPy arrays) into every rank's."""
        for i, a in enumerate(arrays):
            _check_buffer(a, f"arrays[{i}]")
            if self.size > 1:
                self.comm.Bcast(a, root=root)
        return arrays

    def barrier(self):
        self.comm.Barrier()

    def abort(self, code=1):
        """End every rank of the job (MPI_Abort): a rank that cannot go on must not leave the
        others waiting in a collective forever. What this rank printed is given a moment to
        reach the launcher first: MPICH's mpiexec forwards a rank's output through its proxy,
        and an immediate abort lost the last message about 1 run in 10."""
        sys.stdout.flush()
        sys.stderr.flush()
        time.sleep(0.5)
        self.comm.Abort(code)


def _process_state(pid):
    """"running", "stopped" (SIGSTOP, a debugger) or "gone" (ended, or a zombie: dead but not
    yet reaped) for process ``pid`` of this host."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return "gone"
        except PermissionError:
            pass
        return "running"
    return "gone" if state in ("Z", "X") else "stopped" if state in ("T", "t") else "running"


def _check_buffer(a, argument):
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{argument} must be a NumPy array (host memory: MPI sends it as it "
                        f"is); got {_validate.describe(a)}")
    if not a.flags.c_contiguous:
        raise ValueError(f"{argument} must be C-contiguous; use np.ascontiguousarray")


def init(comm=None):
    """Make ``comm`` (an mpi4py communicator; default ``MPI.COMM_WORLD``) the one this
    module's functions use; returns its :class:`Communicator`. Needs mpi4py (``pip install
    fastdl[mpi]``, which brings MPICH too); run under ``mpiexec -n W``."""
    global _COMM
    from mpi4py import MPI

    _COMM = Communicator(MPI.COMM_WORLD if comm is None else comm)
    return _COMM


def communicator():
    """The communicator of :func:`init` (ValueError before it)."""
    if _COMM is None:
        raise ValueError("fastdl.distributed.init() has not been called in this process")
    return _COMM


def rank():
    """This process's rank (0 .. W - 1); 0 before :func:`init`."""
    return 0 if _COMM is None else _COMM.rank


def world_size():
    """The number of processes W; 1 before :func:`init`."""
    return 1 if _COMM is None else _COMM.size


def rank_rows(n_rows, rank=None, world=None):
    """``(first, end)``: the rows of a global batch of ``n_rows`` that ``rank`` of ``world``
    takes, ``floor(rank * n / W)`` to ``floor((rank + 1) * n / W)`` (default: this process's
    rank and world). Rows are split in rank order; when W does not divide n, ranks differ by
    one row at most, and a rank may get none."""
    n_rows = _validate.integer(n_rows, "n_rows", minimum=0)
    world = world_size() if world is None else _validate.integer(world, "world", minimum=1)
    rank = globals()["rank"]() if rank is None else _validate.integer(rank, "rank", minimum=0)
    if rank >= world:
        raise ValueError(f"rank must be in [0, {world}) for world={world}; got {rank}")
    return rank * n_rows // world, (rank + 1) * n_rows // world


def allreduce(array):
    """Sum ``array`` over the ranks in place (the same bits on every rank): the gradient
    allreduce of a step, over a model's flat gradient buffer (``Sequential.flat_grads``)."""
    return communicator().allreduce(array) if world_size() > 1 else array


def broadcast_parameters(params, root=0):
    """Copy rank ``root``'s parameters into every rank's (once, before training: initial
    parameters drawn from different seeds, or loaded by one rank)."""
    params = list(params)
    return communicator().broadcast(params, root) if world_size() > 1 else params


def global_denominator(local, dtype=np.float64):
    """The sum over the ranks of ``local`` (this rank's rows not ignored, or their total class
    weight): what every rank divides its summed loss by, so that the gradients add up to the
    global mean's. A Python float."""
    total = np.array([_validate.number(local, "local")], dtype)
    return float(allreduce(total)[0]) if world_size() > 1 else float(total[0])


def print0(*args, **kwargs):
    """``print`` on rank 0 only (flushed); the other ranks stay quiet."""
    if rank() == 0:
        kwargs.setdefault("flush", True)
        print(*args, **kwargs)


def is_root():
    """Whether this is rank 0 (which logs and writes checkpoints)."""
    return rank() == 0


class Watchdog:
    """Ends the job when this rank makes no progress for ``timeout`` seconds (a rank died or
    hangs, and the others wait for it in a collective forever): prints which ranks are gone
    or stopped (those on this host whose process ended, or was stopped) or, failing that, that
    the others did not answer, then MPI_Abort. Call :meth:`progress` at every step; use as a
    context manager.

    MPICH's ``mpiexec`` ends the whole job at once when a rank's process dies (its message
    names the host and PID: :meth:`Communicator.describe` maps them to ranks); the watchdog
    covers a rank that hangs, and launchers that keep the others running
    (``mpiexec -disable-auto-cleanup``)."""

    def __init__(self, timeout, where="training"):
        self.timeout, self.where = _validate.number(timeout, "timeout", _validate.positive), where
        self._last = time.monotonic()
        self._stop = threading.Event()
        self._thread = None

    def progress(self):
        self._last = time.monotonic()

    def __enter__(self):
        self._thread = threading.Thread(target=self._watch, daemon=True, name="fastdl-watchdog")
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _watch(self):
        while not self._stop.wait(min(1.0, self.timeout / 4)):
            silent = time.monotonic() - self._last
            if silent < self.timeout:
                continue
            comm = communicator()
            who = "; ".join(f"rank {r} ({comm.processes[r][0]} pid {comm.processes[r][1]}) "
                            f"is {state}" for r, state in comm.absent().items()) or \
                "the other ranks did not answer (one died on another host, or hangs)"
            print(f"fastdl: rank {comm.rank} of {comm.size} made no progress in {self.where} "
                  f"for {silent:.0f} s: {who}; ending the job", file=sys.stderr, flush=True)
            comm.abort(1)
            return


def excepthook_aborts():
    """Make an uncaught exception on any rank abort the whole job (MPI_Abort) after printing
    its traceback with the rank, instead of leaving the other ranks waiting in a collective."""
    previous = sys.excepthook

    def hook(kind, value, traceback):
        absent = "" if _COMM is None else "; ".join(
            f"rank {r} ({_COMM.processes[r][0]} pid {_COMM.processes[r][1]}) is {state}"
            for r, state in _COMM.absent().items())
        print(f"fastdl: rank {rank()} of {world_size()} failed"
              f"{' (' + absent + ')' if absent else ''}:", file=sys.stderr, flush=True)
        previous(kind, value, traceback)
        sys.stderr.flush()
        if _COMM is not None and _COMM.size > 1:
            _COMM.abort(1)

    sys.excepthook = hook
