"""Memory sizes the plan needs: one parameter copy, the CPU worker's host memory, and what each
worker adds on the GPUs (no torch).

The profile records no peak memory, so the worker's estimate errs high; it is what a
scheduler request (Slurm --mem, Ray memory, a Kubernetes request) should be able to hold.
"""
from __future__ import annotations

import math

from asam_tune.records.plan import Plan
from asam_tune.records.profile import Profile

# A Python process with torch loaded: about 230 MiB measured for CPU-only torch 2.x, more
# for CUDA builds.
WORKER_PROCESS_BYTES = 512 * 2**20
# The replica's weights, their gradients, the shared weight snapshot and the perturbation.
WORKER_PARAMETER_COPIES = 4
# Activations kept for the backward pass, per byte of input (ResNet-20 on CIFAR keeps about
# 200: ~2.6 MB per 12 KB image).
ACTIVATION_BYTES_PER_INPUT_BYTE = 256

_DTYPE_BYTES = {"float64": 8, "double": 8, "float32": 4, "float": 4, "float16": 2, "half": 2,
                "bfloat16": 2, "float8_e4m3fn": 1, "float8_e5m2": 1, "int8": 1, "uint8": 1}


def dtype_bytes(dtype: str) -> int | None:
    """Bytes per element of 'float32' or 'torch.float32'; None when unknown."""
    return _DTYPE_BYTES.get(dtype.removeprefix("torch."))


def parameter_bytes(profile: Profile) -> tuple[int, str | None]:
    """Bytes of one parameter copy (a measured transfer's size, else count x dtype size) and a
    note when the dtype had to be guessed."""
    measured = [t.parameter_bytes for t in profile.transfers]
    if measured:
        return max(measured), None
    size = dtype_bytes(profile.workload.dtype)
    if size is None:
        return (profile.workload.parameter_count * 4,
                f"unknown dtype {profile.workload.dtype!r}: assumed 4 bytes per parameter")
    return profile.workload.parameter_count * size, None


def worker_host_memory_bytes(plan: Plan) -> int:
    """Process + WORKER_PARAMETER_COPIES parameter copies + activations at the plan's b_p."""
    return WORKER_PROCESS_BYTES + WORKER_PARAMETER_COPIES * plan.parameter_bytes + _activation_bytes(plan)


# Extra accelerator memory of a worker, in copies of the perturbed weights, as the runtime
# allocates it (asam_tune/perturbers): checked by tests/unit/test_worker_memory.py.
# A second stream of the main GPU: the snapshot replica's weights and the perturbation handed
# over (held between jobs), and the gradients while a job runs. The replica's other parameters
# are the model's own; its buffers are clones (small). A full replica with an output copy,
# before, held 4 plus the gradients.
SAME_GPU_WORKER_PARAMETER_COPIES = 3
# A CPU worker fed from a GPU: the gathered weights the copy stream sends from, and the
# perturbation copied up (both on the main GPU).
CPU_WORKER_GPU_PARAMETER_COPIES = 2
# Another GPU: there, the replica, its gradients and the perturbation; on the main GPU, the
# perturbation copied over.
OTHER_GPU_WORKER_PARAMETER_COPIES = 3
OTHER_GPU_MAIN_PARAMETER_COPIES = 1


def _activation_bytes(plan: Plan) -> int:
    input_bytes = math.prod(plan.workload.input_shape) * (dtype_bytes(plan.workload.dtype) or 4)
    return plan.perturbation_batch_size * input_bytes * ACTIVATION_BYTES_PER_INPUT_BYTE


def worker_device_memory_bytes(plan: Plan) -> dict[str, int]:
    """What the plan's worker adds to each accelerator's memory, beyond the main step's own.

    Keyed by device ('cuda:0'); empty when the worker adds nothing on an accelerator (a
    synchronous plan, a CPU-only machine). The ascent's activations at b_p count on the device
    it runs on.
    """
    main = plan.main_device.split("/")[0]
    pert = plan.perturbation
    if plan.mode == "synchronous" or main == "cpu" and pert.device == "cpu":
        return {}
    weights = plan.parameter_bytes
    if pert.device == "cpu":
        return {main: CPU_WORKER_GPU_PARAMETER_COPIES * weights}
    if pert.device == main:
        return {main: SAME_GPU_WORKER_PARAMETER_COPIES * weights + _activation_bytes(plan)}
    extra = {pert.device: OTHER_GPU_WORKER_PARAMETER_COPIES * weights + _activation_bytes(plan)}
    if main != "cpu":
        extra[main] = OTHER_GPU_MAIN_PARAMETER_COPIES * weights
    return extra
