"""Asynchronous SAM under ``torch.distributed`` (torchrun, DDP): cores per rank, failures in lockstep.

Both concerns apply only when a process group of several ranks is initialised:

* Cores. The ranks of a node share its cores. ``divide_cores`` gives every rank's perturbation
  worker its own cores, disjoint from the other ranks' (nearest its GPU where NVML says which
  those are), and every main process an explicit thread count (torchrun sets
  ``OMP_NUM_THREADS=1`` when it is unset). ``place_rank`` learns which ranks share this node
  with one ``all_gather_object`` when ``AsyncSAM`` is built, and applies the rule.
* Failures in lockstep. A worker that dies on one rank must switch every rank to synchronous
  SAM in the same step (or stop every rank, with ``on_worker_failure="raise"``), so that the
  ranks keep running the same algorithm and the same collectives. ``FailureAgreement`` does it
  with one all_reduce of one int per step, at a fixed point of the step.

The perturbation itself stays rank-local: the worker is a separate process whose launcher
variables are stripped before torch loads (``perturbers/process_child.boot``); it never joins the process
group, and its replica is DDP's inner module, so the ascent pass triggers no collective.
"""
from __future__ import annotations

import numbers
import socket
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from asam_tune.errors import UserInputError
from asam_tune import affinity

__all__ = ["FailureAgreement", "RankCores", "RankPlacement", "default_main_cores", "divide_cores",
           "node_id", "place_rank", "process_group_of", "rank_cores"]

_BOOT_ID = "/proc/sys/kernel/random/boot_id"


# ----------------------------------------------------------------------------- the core rule


@dataclass(frozen=True)
class RankCores:
    """One rank's cores: its main process's (compute threads, data loading) and its worker's.

    ``shared``: the node had fewer cores than its ranks need, so these sets overlap other
    ranks' sets (see ``divide_cores``).
    """

    main: tuple[int, ...]
    worker: tuple[int, ...]
    shared: bool = False


def _count(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise UserInputError(f"Invalid {name}: {value!r} (expected an integer >= {minimum})")
    return int(value)


def _core_ids(name: str, cores: Any) -> list[int]:
    if isinstance(cores, (str, bytes)) or not isinstance(cores, Sequence | set | frozenset):
        raise UserInputError(f"Invalid {name}: {cores!r} (expected a sequence of core ids)")
    if any(isinstance(c, bool) or not isinstance(c, numbers.Integral) or c < 0 for c in cores):
        raise UserInputError(f"Invalid {name}: {cores!r} (expected integer core ids >= 0)")
    return sorted({int(c) for c in cores})


def default_main_cores(pool_size: int, ranks: int, worker_threads: int, reserved_cores: int = 0) -> int:
    """Main threads per rank without a plan: the rank's fair share of the node, less its worker's."""
    return max(1, pool_size // ranks - worker_threads - reserved_cores)


def divide_cores(pool: Sequence[int], ranks: int, *, main_cores: int, worker_threads: int,
                 reserved_cores: int = 0,
                 nearest: Sequence[Sequence[int] | None] | None = None) -> list[RankCores]:
    """Divide a node's usable cores among its ``ranks``; entry i is local rank i's.

    Each rank needs ``k = main_cores + reserved_cores + worker_threads`` cores.

    Enough cores (``len(pool) >= ranks * k``): every set is disjoint from every other. Rank by
    rank, the cores nearest its GPU come first (``nearest[i]``, where known), then the rest in
    id order; the rank takes ``main_cores`` for its main process, ``reserved_cores`` for data
    loading, then ``worker_threads`` for its worker. Cores left over are dealt to the main
    sets (data loaders inherit the main process's cores), so no core is idle by decree.

    Too few cores: the sets overlap, and the result says ``shared``. Workers come first:
    rank i's worker takes the ``worker_threads`` cores at positions ``i*w ...`` of the pool,
    cyclically, so the workers stay disjoint while the pool has ``ranks * worker_threads``
    cores; the main sets follow cyclically after them. On a 2-core node with 2 ranks of one
    main thread and one worker thread each, rank 0 gets main (0,) and worker (0,), rank 1 main
    (1,) and worker (1,): four busy threads on two cores, each core serving one worker.
    """
    cores = _core_ids("pool", pool)
    if not cores:
        raise UserInputError(f"Invalid pool: {pool!r} (no usable cores)")
    ranks = _count("ranks", ranks, 1)
    main_cores = _count("main_cores", main_cores, 1)
    worker_threads = _count("worker_threads", worker_threads, 1)
    reserved_cores = _count("reserved_cores", reserved_cores, 0)
    if nearest is not None and len(nearest) != ranks:
        raise UserInputError(f"Invalid nearest: {len(nearest)} entries for {ranks} ranks")
    near = [set(_core_ids("nearest", n)) if n else set() for n in (nearest or [None] * ranks)]
    per_rank = main_cores + reserved_cores + worker_threads
    if len(cores) < ranks * per_rank:
        return _divide_short(cores, ranks, main_cores + reserved_cores, worker_threads)

    leftover = len(cores) - ranks * per_rank
    free = list(cores)
    out = []
    for rank in range(ranks):
        extra = leftover // ranks + (rank < leftover % ranks)
        ordered = [c for c in free if c in near[rank]] + [c for c in free if c not in near[rank]]
        block = ordered[:per_rank + extra]
        start = main_cores + reserved_cores
        worker = block[start:start + worker_threads]
        main = block[:start] + block[start + worker_threads:]
        taken = set(block)
        free = [c for c in free if c not in taken]
        out.append(RankCores(main=tuple(sorted(main)), worker=tuple(sorted(worker))))
    return out


def _divide_short(cores: list[int], ranks: int, main_size: int, worker_threads: int) -> list[RankCores]:
    n = len(cores)

    def cyclic(start: int, size: int) -> tuple[int, ...]:
        return tuple(sorted({cores[(start + j) % n] for j in range(size)}))

    workers_end = ranks * worker_threads
    return [RankCores(main=cyclic(workers_end + rank * main_size, main_size),
                      worker=cyclic(rank * worker_threads, worker_threads), shared=True)
            for rank in range(ranks)]


def rank_cores(usable: Sequence[int], local_rank: int, local_world_size: int, *, main_cores: int,
               worker_threads: int, reserved_cores: int = 0,
               nearest: Sequence[Sequence[int] | None] | None = None) -> RankCores:
    """``local_rank``'s share of the node's ``usable`` cores (``divide_cores`` is the rule).

    ``usable`` is what ``asam_tune.fingerprint.usable_core_ids()`` returns on the node;
    ``nearest[i]`` the cores nearest local rank i's GPU (``GpuInfo.nearest_cores``), or None.
    Every rank computes the whole division from the same inputs, so the sets agree.
    """
    local_world_size = _count("local_world_size", local_world_size, 1)
    local_rank = _count("local_rank", local_rank, 0)
    if local_rank >= local_world_size:
        raise UserInputError(f"Invalid local_rank: {local_rank!r} (local_world_size is {local_world_size})")
    return divide_cores(usable, local_world_size, main_cores=main_cores, worker_threads=worker_threads,
                        reserved_cores=reserved_cores, nearest=nearest)[local_rank]


# ----------------------------------------------------------------------------- placing a rank


@dataclass(frozen=True)
class RankPlacement:
    """What ``place_rank`` decided for this rank."""

    local_rank: int  # among the ranks sharing this node's cores
    local_world_size: int
    cores: RankCores
    main_threads: int  # torch.set_num_threads of the main process
    worker_threads: int
    main_pinned: bool  # the main process (and its children) was pinned to ``cores.main``


def process_group_of(model: nn.Module) -> Any:
    """The group whose ranks train ``model`` together: DDP's, else the default one.

    None unless torch.distributed is initialised with more than one rank in that group.
    """
    if not dist.is_available() or not dist.is_initialized():
        return None
    from torch.nn.parallel import DistributedDataParallel

    group = getattr(model, "process_group", None) if isinstance(model, DistributedDataParallel) else None
    if group is None:
        group = dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


def node_id() -> str:
    """Which operating system this process runs in: the host name and the boot id."""
    try:
        boot = Path(_BOOT_ID).read_text(encoding="ascii").strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


def _gpu_nearest_cores(device: torch.device | None) -> tuple[int, ...] | None:
    if device is None or device.type != "cuda":
        return None
    from asam_tune.fingerprint import collect_fingerprint

    index = device.index if device.index is not None else torch.cuda.current_device()
    gpu = next((g for g in collect_fingerprint().gpus if g.index == index), None)
    return None if gpu is None else gpu.nearest_cores


def place_rank(group: Any, *, worker_threads: int, main_cores: int | None = None, reserved_cores: int = 0,
               expected_local_world_size: int | None = None, main_device: torch.device | None = None,
               usable: Sequence[int] | None = None, apply: bool = True) -> RankPlacement:
    """Divide this node's cores among the ranks on it; set this rank's main threads and cores.

    Collective: every rank of ``group`` must call it (``AsyncSAM`` does, when built). Ranks
    share a node when they run in the same OS (``node_id``) and see the same usable cores; a
    launcher that already gave each rank its own cores (Slurm ``--cpu-bind``) is respected.
    ``main_cores`` None: ``default_main_cores``. ``apply`` False only computes.
    """
    worker_threads = _count("worker_threads", worker_threads, 1)
    reserved_cores = _count("reserved_cores", reserved_cores, 0)
    if main_cores is not None:
        main_cores = _count("main_cores", main_cores, 1)
    if usable is None:
        from asam_tune.fingerprint import usable_core_ids

        usable = usable_core_ids()
    me = {"node": node_id(), "pool": tuple(_core_ids("usable", usable)), "nearest": _gpu_nearest_cores(main_device),
          "sizes": (main_cores, reserved_cores, worker_threads)}
    everyone: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, me, group=group)
    mine = dist.get_rank(group)
    # Every rank sees the same list, so every rank takes the same decisions below.
    if len({info["sizes"] for info in everyone}) != 1:
        raise UserInputError(f"ranks disagree on (main_cores, reserved_cores, worker_threads): "
                             f"{sorted({info['sizes'] for info in everyone}, key=str)}")
    same_node = [i for i, info in enumerate(everyone) if info["node"] == me["node"]]
    peers = [i for i in same_node if everyone[i]["pool"] == me["pool"]]
    overlapping = [i for i in same_node if i not in peers and set(everyone[i]["pool"]) & set(me["pool"])]
    if overlapping:
        warnings.warn(f"asam-tune: ranks {overlapping} on this node may run on some of rank {mine}'s cores "
                      f"{list(me['pool'])} with other masks: their cores cannot be kept apart", RuntimeWarning,
                      stacklevel=3)
    pool, ranks, local_rank = me["pool"], len(peers), peers.index(mine)
    main = main_cores if main_cores is not None else default_main_cores(len(pool), ranks, worker_threads,
                                                                         reserved_cores)
    nearest = [everyone[i]["nearest"] for i in peers]
    cores = rank_cores(pool, local_rank, ranks, main_cores=main, worker_threads=worker_threads,
                       reserved_cores=reserved_cores, nearest=nearest if any(nearest) else None)
    if cores.shared:
        need = ranks * (main + reserved_cores + worker_threads)
        warnings.warn(f"asam-tune: {ranks} ranks on this node need {need} cores ({main} main + {reserved_cores} "
                      f"reserved + {worker_threads} worker each) but {len(pool)} are usable; sharing them: rank "
                      f"{mine}'s worker runs on cores {list(cores.worker)}, its main process is not pinned",
                      RuntimeWarning, stacklevel=3)
    if expected_local_world_size is not None and expected_local_world_size != ranks:
        warnings.warn(f"asam-tune: the plan was made for {expected_local_world_size} ranks per node, but "
                      f"{ranks} share this node's cores; re-plan with --nproc-per-node {ranks}",
                      RuntimeWarning, stacklevel=3)
    placement = RankPlacement(local_rank=local_rank, local_world_size=ranks, cores=cores, main_threads=main,
                              worker_threads=worker_threads, main_pinned=apply and not cores.shared)
    if apply:
        # Explicit: torchrun leaves OMP_NUM_THREADS=1 when several ranks share a node.
        torch.set_num_threads(main)
        if placement.main_pinned and affinity.can_pin():
            from asam_tune.fingerprint import remember_affinity_before_pinning

            # Pinned by us, this process is still on the same machine for plans checked later.
            remember_affinity_before_pinning(affinity.allowed_cores())
            affinity.pin_process(cores.main)  # every thread; children (data loaders) inherit it
    return placement


# ----------------------------------------------------------------------------- failures in lockstep


def _agreement_device(group: Any, main_device: torch.device) -> torch.device:
    # gloo and MPI reduce CPU tensors (also in a mixed "cpu:gloo,cuda:nccl" group); NCCL and
    # other accelerator backends reduce tensors on the rank's device.
    backend = str(dist.get_backend(group)).lower()
    if "gloo" in backend or "mpi" in backend or main_device.type == "cpu":
        return torch.device("cpu")
    return main_device


class FailureAgreement:
    """Every rank learns, in the same step, whether any rank's perturbation worker failed.

    One all_reduce (MIN) of one int64 per call: a rank whose worker failed contributes its
    rank, the others the group size, so every rank gets the lowest failing rank or "none".
    ``calls`` and ``seconds`` (the time inside ``agree``, the device sync included) say what it
    cost; with NCCL ``.item()`` waits for the rank's queued GPU work.
    """

    def __init__(self, group: Any, main_device: torch.device):
        self._group = group
        self._rank = dist.get_rank(group)
        self._size = dist.get_world_size(group)
        self._flag = torch.zeros(1, dtype=torch.int64, device=_agreement_device(group, main_device))
        self.calls = 0
        self.seconds = 0.0

    def agree(self, failed: bool) -> int | None:
        """The lowest rank (in the group) whose worker failed, or None; collective."""
        started = time.perf_counter()
        self._flag.fill_(self._rank if failed else self._size)
        dist.all_reduce(self._flag, op=dist.ReduceOp.MIN, group=self._group)
        lowest = int(self._flag.item())
        self.calls += 1
        self.seconds += time.perf_counter() - started
        return None if lowest >= self._size else lowest
