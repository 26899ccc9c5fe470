"""Several processes, one pipeline: the glue between the stages and ``torch.distributed``.

Why it looks like this:

- **torchrun is the launcher.** Rank, world size and the rendezvous come from the environment
  torchrun sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``);
  ``mlpmem run --nproc N`` only re-launches itself under ``python -m torch.distributed.run``.
  Without that environment nothing here does anything, so a single process behaves exactly as
  before.
- **Every rank runs the same command.** A heavy stage splits its work by rank (windows for the
  datastore, row ranges for the index and the targets, batches for training); each rank writes
  its own part of the stage's files, and rank 0 writes the manifest after a barrier. A light
  stage (tokenising, training the index's quantizer, the report) runs on rank 0 first
  (:func:`main_first`) while the others wait, then the others find it complete and reuse it:
  the same idempotent stage code, no message passing of results.
- **One backend string for both devices**: ``cpu:gloo,cuda:nccl``, so CPU tensors (barriers,
  flags, gradients of a CPU memory) go through gloo and CUDA tensors through NCCL.
- **Threads per rank** = this node's cores / this node's ranks: two torch processes with two
  threads each on two cores were measured to slow each other about 10x. While rank 0 works alone
  in :func:`main_first` it takes every core of its node, since the others only wait.
- **No pickle**: only tensors cross process boundaries (no ``*_object`` collectives).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from datetime import timedelta

ENV_THREADS = "MLPMEM_THREADS"  # overrides the threads per rank (e.g. a node shared with other jobs)
ENV_TIMEOUT_MIN = "MLPMEM_DIST_TIMEOUT_MIN"  # how long a rank waits at a barrier (rank 0 may work alone for long)
DEFAULT_TIMEOUT_MIN = 360


def launched() -> bool:
    """True in a process started by torchrun with more than one rank in the job."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


_solo_depth = 0  # > 0 inside main_first: one rank works alone, so no collective may run there


def _joined() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_distributed() -> bool:
    """True where the ranks work together (under torchrun, outside a :func:`main_first` step)."""
    return _solo_depth == 0 and _joined()


def rank() -> int:
    """This process's rank in the job (0 without torchrun)."""
    import torch.distributed as dist

    return dist.get_rank() if _joined() else 0


def world_size() -> int:
    """Ranks sharing the current work: 1 without torchrun and inside a :func:`main_first` step."""
    import torch.distributed as dist

    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def local_world_size() -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if launched() else 1


def threads_per_rank(local_ranks: int | None = None) -> int:
    """Threads for torch and FAISS in each rank: this node's cores shared by this node's ranks."""
    if os.environ.get(ENV_THREADS):
        return max(1, int(os.environ[ENV_THREADS]))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // (local_ranks or local_world_size()))


def set_threads(n: int) -> None:
    import faiss
    import torch

    torch.set_num_threads(n)
    faiss.omp_set_num_threads(n)


@contextmanager
def thread_count(n: int | None):
    """Run a block on ``n`` threads (torch and FAISS), then restore the counts: a command called in-process
    (tests, notebooks) must not leave the caller's reductions summing in another order."""
    if not n:
        yield
        return
    import faiss
    import torch

    before = torch.get_num_threads(), faiss.omp_get_max_threads()
    set_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before[0])
        faiss.omp_set_num_threads(before[1])


def init() -> None:
    """Join the torchrun job (once): process group, threads, CUDA device; quiet logs and bars on ranks > 0."""
    if not launched():
        return
    import torch
    import torch.distributed as dist

    if int(os.environ.get("RANK", "0")) != 0:
        _silence_progress_bars()
    if not dist.is_initialized():
        minutes = float(os.environ.get(ENV_TIMEOUT_MIN, DEFAULT_TIMEOUT_MIN))
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=minutes))
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    set_threads(threads_per_rank())


def _silence_progress_bars() -> None:
    """One progress bar per job, rank 0's: every tqdm bar of this process is created disabled (call sites
    pass ``disable=...`` themselves, which would override tqdm's TQDM_DISABLE environment default)."""
    from tqdm import std

    init = std.tqdm.__init__

    def disabled(self, *args, **kwargs):
        kwargs["disable"] = True
        init(self, *args, **kwargs)

    std.tqdm.__init__ = disabled


def shutdown() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        import torch.distributed as dist

        dist.barrier()


def broadcast_flag(value: bool) -> bool:
    """Rank 0's ``value`` on every rank."""
    if not is_distributed():
        return value
    import torch
    import torch.distributed as dist

    t = torch.tensor([1 if value else 0], dtype=torch.int64)
    dist.broadcast(t, src=0)
    return bool(t.item())


def all_reduce_sum(values: list[float]) -> list[float]:
    """Element-wise sum over ranks of a few float64 numbers (losses, counts)."""
    if not is_distributed():
        return list(values)
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def span(n: int, part: int | None = None, parts: int | None = None) -> tuple[int, int]:
    """The contiguous range [a, b) of ``n`` items that rank ``part`` of ``parts`` owns (default: this rank)."""
    parts = world_size() if parts is None else parts
    part = (rank() if parts > 1 else 0) if part is None else part
    return n * part // parts, n * (part + 1) // parts


def my_share(items: list) -> list:
    """This rank's contiguous slice of ``items`` (every rank must pass the same list)."""
    a, b = span(len(items))
    return items[a:b]


@contextmanager
def all_cores():
    """Rank 0 alone at work (the others wait at a barrier): let it use every core of its node."""
    if not is_distributed() or local_world_size() == 1 or os.environ.get(ENV_THREADS):
        yield
        return
    import torch

    with thread_count(torch.get_num_threads() * local_world_size()):
        yield


@contextmanager
def _solo():
    global _solo_depth
    _solo_depth += 1
    try:
        yield
    finally:
        _solo_depth -= 1


def main_first(fn):
    """``fn()`` on rank 0 (with all its node's cores), then on the other ranks once rank 0 is done.

    For idempotent stage steps: rank 0 builds, the others then find the finished result and load it.
    Inside ``fn`` every rank works alone (no collectives; a nested parallel stage runs as one process).
    A failure on rank 0 ends its process, and torchrun stops the others.
    """
    if not is_distributed():
        return fn()
    if is_main():
        with all_cores(), _solo():
            result = fn()
        barrier()
        return result
    barrier()
    with _solo():
        return fn()
