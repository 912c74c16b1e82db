"""Multi-host runs: every process joins one JAX job (`jax.distributed.initialize`) and then sees
all hosts' devices, so a tensor-parallel mesh can span hosts.

The engine runs in every process (multi-controller, as JAX runs TPU pods): each process loads
the same model, submits the same requests in the same order, and its scheduler, which is
deterministic, plans the same steps; the one compiled step spans every device and its sampled
tokens come back replicated, so all processes stay in step. Hence the contract: every process
runs the same program on the same requests, and only the leader (process 0) reports.
"""

from __future__ import annotations

import jax


def initialize(coordinator_address: str, num_processes: int, process_id: int) -> None:
    """Join the job whose coordinator (process 0) listens at "host:port". Call before anything
    touches a device."""
    host, _, port = coordinator_address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"coordinator_address must be host:port, got {coordinator_address!r}")
    if num_processes < 1:
        raise ValueError(f"num_processes must be at least 1, got {num_processes}")
    if not 0 <= process_id < num_processes:
        raise ValueError(f"process_id must be in [0, {num_processes}), got {process_id}")
    # Cross-process collectives of the CPU backend (the CPU tests, CPU-only hosts); GPUs and
    # TPUs bring their own (NCCL, ICI/DCN).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)


def is_leader() -> bool:
    """Whether this process reports (prints, writes files): process 0."""
    return jax.process_index() == 0
