"""Every use of a private API of a pinned dependency, each behind a small named function.

What these rely on is not part of the libraries' public contract, so it can change in any release:
tests/test_compat.py checks them against the installed versions and fails by name (each Ray function by its own
test, the FFCV internals through `check_ffcv`'s table). Ray and FFCV are imported inside the functions.
"""
from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

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


# ---------------------------------------------------------------- FFCV (pinned in pyproject.toml)

# What each function below relies on: (module, attribute, the parameters or attributes it must have).
FFCV_NAMES = [
    ("ffcv.writer", "DatasetWriter", ("prepare", "finalize")),
    ("ffcv.writer", "worker_job_indexed_dataset", ("input_queue", "metadata_sm", "metadata_type", "fields",
                                                   "allocator", "done_number", "allocations_queue", "dataset")),
    ("ffcv.memory_allocator", "MemoryAllocator", ("fname", "offset_start", "page_size")),
    ("ffcv.fields.rgb_image", "resizer", ("image", "target_resolution")),
    ("ffcv.traversal_order.random", "Random", ("sample_order",)),
    ("ffcv.traversal_order.sequential", "Sequential", ("sample_order",)),
    ("ffcv.loader", "Loader", ("next_traversal_order",)),
]


def check_ffcv() -> list[str]:
    """What of FFCV_NAMES the installed FFCV lacks, one line each (empty when all is there)."""
    import importlib

    problems = []
    for module_name, name, needs in FFCV_NAMES:
        try:
            thing = getattr(importlib.import_module(module_name), name)
        except (ImportError, AttributeError) as err:
            problems.append(f"{module_name}.{name}: missing ({err})")
            continue
        have = set(dir(thing)) if inspect.isclass(thing) else set(inspect.signature(thing).parameters)
        if inspect.isclass(thing):
            have |= set(inspect.signature(thing.__init__).parameters)
        problems += [f"{module_name}.{name}: no {need!r}" for need in needs if need not in have]
    return problems


# --------------------------------------------------------------------------- writing

def writer_begin(writer, num_samples: int) -> tuple:
    """Write the .beton header and create the shared metadata table; returns the arguments each writer process
    takes before its own (metadata memory, its dtype, the fields, the page allocator)."""
    from ffcv.memory_allocator import MemoryAllocator

    writer.num_samples = num_samples
    writer.prepare()
    allocator = MemoryAllocator(writer.fname, writer.data_region_start, writer.page_size)
    return writer.metadata_sm, writer.metadata_type, writer.fields, allocator


def writer_job():
    """The function a writer process runs: (work queue, *writer_begin's tuple, done counter, allocations queue,
    dataset); it encodes dataset[i] for each (destination, i) of each chunk it takes."""
    from ffcv.writer import worker_job_indexed_dataset

    return worker_job_indexed_dataset


def writer_end(writer, allocations: list) -> None:
    """Write the metadata table and the page allocations: the .beton is complete."""
    writer.finalize(allocations)


def writer_release(writer) -> None:
    """Free the shared metadata table (also after a failure)."""
    if hasattr(writer, "metadata_sm"):
        writer.metadata_sm.close()
        writer.metadata_sm.unlink()


def fit_within(image: np.ndarray, max_side: int | None) -> np.ndarray:
    """An H x W x 3 image shrunk (never enlarged) so its long side is at most max_side, exactly as FFCV's
    RGBImageField(max_resolution=max_side) stores it."""
    from ffcv.fields.rgb_image import resizer

    return resizer(image, max_side)


# --------------------------------------------------------------------------- reading

@dataclass
class BetonTables:
    """A .beton's header fields and tables, as FFCV's Reader parses them."""

    num_samples: int
    field_names: list[str]
    handlers: dict          # field name -> Field
    metadata: np.ndarray    # one row per sample, a column per field
    alloc_table: np.ndarray  # (sample_id, ptr, size) per stored blob
    data_end: int           # where the allocation table starts


def beton_tables(path) -> BetonTables:
    from ffcv.reader import Reader

    reader = Reader(str(path))
    return BetonTables(int(reader.num_samples), list(reader.field_names), dict(reader.handlers), reader.metadata,
                       reader.alloc_table, int(reader.header["alloc_table_ptr"]))


def next_epoch(loader) -> int:
    """The epoch an FFCV loader's next pass will use (it counts up on each pass)."""
    return loader.next_epoch


def set_next_epoch(loader, epoch: int) -> None:
    loader.next_epoch = epoch


def epoch_order(indices: np.ndarray, *, seed: int, epoch: int, shuffle: bool, distributed: bool) -> np.ndarray:
    """The sample order FFCV's Loader(order=RANDOM if shuffle else SEQUENTIAL, seed, distributed, indices) reads in
    `epoch`, from FFCV's own traversal classes: other loaders that use it batch exactly as FFCV does."""
    from types import SimpleNamespace

    from ffcv.traversal_order.random import Random
    from ffcv.traversal_order.sequential import Sequential

    stand_in = SimpleNamespace(indices=np.asarray(indices), seed=seed, distributed=distributed)
    return np.asarray((Random if shuffle else Sequential)(stand_in).sample_order(epoch))
