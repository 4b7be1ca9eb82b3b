"""What a tuning trial may choose, and where each choice puts the processes (no torch).

The search space comes from the plan: its main device stays fixed; the perturbation device is
one of the plan's (its choice and alternatives) or the CPU; a CPU worker's thread count, a
CPU main process's thread count (the core split on a CPU-only machine) and ``b_p`` are free
within the cores this machine offers. Optuna parameters::

    perturbation               categorical: 'cpu', 'cuda:N', 'cuda:N+stream'
    main_threads               int, only when the main device is the CPU
    worker_threads             int, only for a CPU worker
    perturbation_batch_size    int in [1, B], log scale
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from asam_tune.errors import UserInputError
from asam_tune.records.plan import PerturbationDevice, Plan


@dataclass(frozen=True)
class TrialConfig:
    """One configuration to measure."""

    perturbation: str  # 'cpu', 'cuda:N' or 'cuda:N+stream'
    main_threads: int | None  # CPU main only
    worker_threads: int | None  # CPU worker only
    perturbation_batch_size: int

    @property
    def worker_device(self) -> str:
        """The device AsyncSAM takes: a second stream is asked for by naming the main GPU."""
        return self.perturbation.removesuffix("+stream")

    def params(self) -> dict[str, Any]:
        """The Optuna parameters that make ``SearchSpace.suggest`` return this configuration."""
        params: dict[str, Any] = {"perturbation": self.perturbation}
        if self.main_threads is not None:
            params["main_threads"] = self.main_threads
        if self.worker_threads is not None:
            params["worker_threads"] = self.worker_threads
        params["perturbation_batch_size"] = self.perturbation_batch_size
        return params

    def label(self) -> str:
        worker = f"cpu/{self.worker_threads}t" if self.worker_threads else self.perturbation
        main = f"main {self.main_threads}t + " if self.main_threads else ""
        return f"{main}{worker}, b_p={self.perturbation_batch_size}"


def perturbation_label(perturbation: PerturbationDevice, main_device: str) -> str:
    """'cpu', 'cuda:1', or 'cuda:0+stream' for a worker on the main GPU."""
    if perturbation.device == "cpu":
        return "cpu"
    if perturbation.secondary_stream or perturbation.device == main_device:
        return f"{perturbation.device}+stream"
    return perturbation.device


def _main_threads(main_key: str) -> int | None:
    """'cpu/4t' -> 4; an accelerator -> None."""
    device, _, threads = main_key.partition("/")
    return int(threads.rstrip("t")) if device == "cpu" and threads else None


@dataclass(frozen=True)
class SearchSpace:
    batch_size: int
    main_device: str  # 'cpu' or 'cuda:N'
    perturbations: tuple[str, ...]
    core_budget: int  # cores for the main process and a CPU worker together (reserved ones excluded)
    accelerator_main_cores: int = 1  # cores driving an accelerator main device

    @property
    def cpu_main(self) -> bool:
        return self.main_device == "cpu"

    @classmethod
    def from_plan(cls, plan: Plan, usable_cores: int) -> SearchSpace:
        """The space around ``plan`` on a machine with ``usable_cores`` cores."""
        if plan.nproc_per_node != 1:
            raise UserInputError(f"tune measures one process; the plan is for nproc_per_node "
                                 f"{plan.nproc_per_node}: plan again with --nproc-per-node 1")
        main_device = plan.main_device.split("/")[0]
        budget = usable_cores - plan.reserved_cores
        main_floor = 1 if main_device == "cpu" else plan.main_cores
        choices = [perturbation_label(plan.perturbation, main_device)] if plan.mode != "synchronous" else []
        choices += [perturbation_label(a.perturbation, main_device) for a in plan.alternatives
                    if a.main_device.split("/")[0] == main_device]
        if budget - main_floor >= 1:
            choices.append("cpu")
        else:
            choices = [c for c in choices if c != "cpu"]
        if main_device == "cpu":
            choices = [c for c in choices if c == "cpu"]  # a CPU main has no accelerator beside it in a plan
        perturbations = tuple(dict.fromkeys(choices))  # unique, the plan's choice first
        if not perturbations:
            raise UserInputError(f"nothing to tune: {usable_cores} usable core(s) here, {plan.reserved_cores} "
                                 f"reserved, leave no core for a CPU worker and the plan names no other device")
        return cls(plan.batch_size, main_device, perturbations, budget,
                   plan.main_cores if main_device != "cpu" else 1)

    # ------------------------------------------------------------------ Optuna

    def suggest(self, trial: Any) -> TrialConfig:
        """Ask an Optuna trial for one configuration (define-by-run: ranges follow earlier choices)."""
        perturbation = trial.suggest_categorical("perturbation", list(self.perturbations))
        cpu_worker = perturbation == "cpu"
        main_threads = None
        if self.cpu_main:
            main_threads = trial.suggest_int("main_threads", 1, self.core_budget - (1 if cpu_worker else 0))
        main_cores = main_threads if self.cpu_main else self.accelerator_main_cores
        worker_threads = trial.suggest_int("worker_threads", 1, self.core_budget - main_cores) if cpu_worker else None
        b_p = trial.suggest_int("perturbation_batch_size", 1, self.batch_size, log=True)
        return TrialConfig(perturbation, main_threads, worker_threads, b_p)

    def clamp(self, config: TrialConfig) -> TrialConfig | None:
        """``config`` moved inside this space (fewer threads on a smaller machine); None if outside."""
        if config.perturbation not in self.perturbations:
            return None
        cpu_worker = config.perturbation == "cpu"
        main_threads = None
        if self.cpu_main:
            main_threads = min(config.main_threads or 1, self.core_budget - (1 if cpu_worker else 0))
        main_cores = main_threads if self.cpu_main else self.accelerator_main_cores
        worker_threads = min(config.worker_threads or 1, self.core_budget - main_cores) if cpu_worker else None
        b_p = min(max(config.perturbation_batch_size, 1), self.batch_size)
        return TrialConfig(config.perturbation, main_threads, worker_threads, b_p)

    def planned_config(self, plan: Plan) -> TrialConfig | None:
        """The cost model's choice as a configuration of this space (the first trial).

        A synchronous plan chose no perturbation device: its best alternative stands in.
        """
        if plan.mode != "synchronous":
            candidates = [(plan.main_device, plan.perturbation, plan.perturbation_batch_size)]
        else:
            candidates = [(a.main_device, a.perturbation, a.perturbation_batch_size) for a in plan.alternatives]
        for main_key, perturbation, b_p in candidates:
            if main_key.split("/")[0] != self.main_device:
                continue
            config = TrialConfig(perturbation_label(perturbation, self.main_device), _main_threads(main_key),
                                 perturbation.threads if perturbation.device == "cpu" else None, b_p)
            clamped = self.clamp(config)
            if clamped is not None:
                return clamped
        return None

    # ------------------------------------------------------------------ placement

    def placement(self, config: TrialConfig, usable_core_ids: tuple[int, ...], reserved_cores: int = 0,
                  nearest_cores: tuple[int, ...] = ()) -> tuple[tuple[int, ...], tuple[int, ...] | None]:
        """(main process cores, CPU worker cores or None) on this machine.

        As the planner does: cores nearest the main GPU first, the main process's, then the
        reserved ones (data loading), then the worker's.
        """
        pool = _pool(usable_core_ids, nearest_cores)
        main_count = config.main_threads if self.cpu_main else self.accelerator_main_cores
        main = tuple(pool[:main_count])
        if config.worker_threads is None:
            return main, None
        start = main_count + reserved_cores
        worker = tuple(pool[start:start + config.worker_threads])
        if len(worker) != config.worker_threads:
            raise UserInputError(f"{config.label()} needs {main_count + reserved_cores + config.worker_threads} "
                                 f"cores; this machine offers {len(pool)}")
        return main, worker

    def baseline_cores(self, usable_core_ids: tuple[int, ...], nearest_cores: tuple[int, ...] = ()) -> tuple[int, ...]:
        """Where SGD and SAM run for comparison: every core but the reserved ones for a CPU main
        (the planner's baseline), the core driving the main GPU otherwise."""
        pool = _pool(usable_core_ids, nearest_cores)
        return tuple(pool[: self.core_budget if self.cpu_main else self.accelerator_main_cores])


def _pool(usable_core_ids: tuple[int, ...], nearest_cores: tuple[int, ...]) -> list[int]:
    """Usable cores, those nearest the main GPU first."""
    near = [c for c in nearest_cores if c in usable_core_ids]
    return near + [c for c in usable_core_ids if c not in near]
