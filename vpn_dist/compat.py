"""The FFCV internals vpn-dist relies on, each behind one small named function.

FFCV documents its Loader, DatasetWriter, fields and decoders; the rest (the writer's per-process job, the
reader's tables, the loader's epoch counter, its traversal orders) is undocumented and may change between
releases. Everything outside this module reaches those parts only through the functions here, and
`check_ffcv()` (run by tests/test_compat.py) names any of them the installed FFCV no longer provides.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import numpy as np

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
