"""Every use of a private API of a pinned dependency, each behind a small named function.

What these rely on is not part of the libraries' public contract, so it can change in any release:
tests/test_compat.py checks each function against the installed version and fails by the function's name.
Imports stay inside the functions: importing this module loads neither Ray nor FFCV.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

# ---------------------------------------------------------------- Ray (pinned in pyproject.toml)

RAY_CHECKPOINT_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's list of the checkpoints it was given


def init_local_ray(num_cpus: int) -> None:
    """A local Ray bound to loopback: its node address (a private argument of ray.init) and its dashboard."""
    import ray

    ray.init(_node_ip_address="127.0.0.1", dashboard_host="127.0.0.1", num_cpus=num_cpus)


def forget_ray_checkpoints(checkpoints_dir: Path) -> None:
    """Delete Ray Train's snapshot of the checkpoints in CHECKPOINTS_DIR. After one of them was moved away, Ray would
    refuse to start from a snapshot naming it; without the snapshot it starts a new one (vpn-dist finds checkpoints
    by their directories)."""
    (Path(checkpoints_dir) / RAY_CHECKPOINT_SNAPSHOT).unlink(missing_ok=True)


def local_cluster_address() -> str | None:
    """What RAY_ADDRESS=auto means on this machine (Ray's own lookup of a running local cluster): HOST:PORT, or None.
    Raises what Ray's lookup raises when it finds several or a broken one."""
    from ray._private.services import canonicalize_bootstrap_address

    return canonicalize_bootstrap_address("auto")


def cluster_max_resources() -> dict[str, float] | None:
    """The most a joined cluster can hold (its autoscaler's configured maximum), or None when it publishes none."""
    from ray._private import state

    return state.state.get_max_resources_from_cluster_config()


def cluster_has_autoscaler() -> bool:
    """The joined cluster runs Ray's autoscaler (it publishes its status), so nodes it lacks now may come."""
    from ray.experimental.internal_kv import _internal_kv_get

    return bool(_internal_kv_get("__autoscaling_status"))


def drained_for_idleness(node: dict[str, Any]) -> bool:
    """A dead node of ray.nodes() that the autoscaler removed for being idle (so it held no worker of a run)."""
    from ray.core.generated.common_pb2 import NodeDeathInfo

    return node.get("DeathReason") == NodeDeathInfo.AUTOSCALER_DRAIN_IDLE


def worker_exception(failure: BaseException) -> BaseException:
    """What a Ray Train worker raised, from the wrapper Ray Train reports it in (the wrapper itself otherwise)."""
    return getattr(failure, "_base_exc", failure)


def hide_ray_train_report_dumps() -> None:
    """Keep Ray Train's `Reporting training result N: TrainingReport(...)` line (one per rank per epoch) off the
    console. Its logger is named by its file's path (outside `ray.train`, so LoggingConfig's level misses it) and
    reaches the console through Ray's plain handler; Ray's log files still get it."""
    from ray._private.log import PlainRayHandler
    from ray.train.v2._internal.execution.context import logger as report_logger

    for handler in logging.getLogger().handlers:
        if isinstance(handler, PlainRayHandler):
            handler.addFilter(lambda record: record.name != report_logger.name)
