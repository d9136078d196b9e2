"""What vpn_dist/compat.py relies on in the pinned Ray, one test per function, named after it: a Ray upgrade that moves
or changes a private API fails here, by name, instead of deep inside a run on a cluster."""
from __future__ import annotations

import inspect
import logging
import re
from pathlib import Path

import numpy as np

import pytest

from vpn_dist import compat

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def test_the_installed_ray_is_the_pinned_one():
    import ray

    pinned = re.search(r'"ray\[[^\]]*\]==([^"]+)"', PYPROJECT.read_text())[1]
    assert ray.__version__ == pinned, (f"Ray {ray.__version__} is installed, pyproject.toml pins {pinned}: run this "
                                       f"module against the new version and adapt vpn_dist/compat.py")


def test_init_local_ray():
    import ray

    params = inspect.signature(ray.init).parameters
    assert "dashboard_host" in params and "num_cpus" in params, "init_local_ray: ray.init's arguments changed"
    source = inspect.getsource(ray.init)
    assert 'kwargs.pop("_node_ip_address"' in source, "init_local_ray: ray.init no longer takes _node_ip_address"


def test_forget_ray_checkpoints(tmp_path):
    from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME

    assert CHECKPOINT_MANAGER_SNAPSHOT_FILENAME == compat.RAY_CHECKPOINT_SNAPSHOT, \
        "forget_ray_checkpoints: Ray Train names its checkpoint snapshot otherwise"
    (tmp_path / compat.RAY_CHECKPOINT_SNAPSHOT).write_text("{}")
    (tmp_path / "epoch_0001").mkdir()
    compat.forget_ray_checkpoints(tmp_path)
    compat.forget_ray_checkpoints(tmp_path)  # none there: nothing to do
    assert [p.name for p in tmp_path.iterdir()] == ["epoch_0001"]


def test_local_cluster_address():
    from ray._private import services

    params = inspect.signature(services.canonicalize_bootstrap_address).parameters
    assert list(params)[:1] == ["addr"], "local_cluster_address: canonicalize_bootstrap_address(addr) changed"


def test_cluster_max_resources():
    from ray._private import state

    assert callable(getattr(state.state, "get_max_resources_from_cluster_config", None)), \
        "cluster_max_resources: ray._private.state.state.get_max_resources_from_cluster_config is gone"


def test_cluster_has_autoscaler():
    from ray.experimental import internal_kv

    assert callable(getattr(internal_kv, "_internal_kv_get", None)), \
        "cluster_has_autoscaler: ray.experimental.internal_kv._internal_kv_get is gone"


def test_drained_for_idleness():
    from ray.core.generated.common_pb2 import NodeDeathInfo

    drained = {"DeathReason": NodeDeathInfo.AUTOSCALER_DRAIN_IDLE}
    assert compat.drained_for_idleness(drained) and not compat.drained_for_idleness({"DeathReason": 0})


def test_worker_exception():
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback

    raised = ValueError("diverged")
    assert compat.worker_exception(UserExceptionWithTraceback(raised, "traceback")) is raised, \
        "worker_exception: Ray Train's wrapper no longer keeps the worker's exception as _base_exc"
    assert compat.worker_exception(raised) is raised


def test_hide_ray_train_report_dumps(monkeypatch):
    from ray._private.log import PlainRayHandler
    from ray.train.v2._internal.execution import context

    assert isinstance(context.logger, logging.Logger), \
        "hide_ray_train_report_dumps: ray.train.v2._internal.execution.context has no module logger"
    assert "Reporting training result" in inspect.getsource(context), \
        "hide_ray_train_report_dumps: the report dump is no longer logged by that module"
    handler = PlainRayHandler()
    monkeypatch.setattr(logging.getLogger(), "handlers", [handler])
    compat.hide_ray_train_report_dumps()
    dump = logging.LogRecord(context.logger.name, logging.INFO, __file__, 1, "Reporting training result", None, None)
    other = logging.LogRecord("ray.train", logging.INFO, __file__, 1, "anything else", None, None)
    assert not handler.filter(dump) and handler.filter(other)


# The Ray section's functions each have a test of their own; the FFCV section's are named in check_ffcv's table.
FFCV_LINE = inspect.getsource(compat).split("FFCV (pinned")[0].count("\n") + 1
RAY_FUNCTIONS = [n for n, f in vars(compat).items() if inspect.isfunction(f) and f.__module__ == compat.__name__
                 and inspect.getsourcelines(f)[1] < FFCV_LINE]


@pytest.mark.parametrize("name", RAY_FUNCTIONS)
def test_every_compat_function_has_its_test(name):
    assert f"test_{name}" in globals(), f"vpn_dist/compat.py's {name} has no test_{name} in tests/test_compat.py"


# ---------------------------------------------------------------- FFCV

def test_the_pinned_ffcv_has_every_internal_we_use():
    problems = compat.check_ffcv()
    assert not problems, "FFCV changed what vpn_dist/compat.py relies on:\n" + "\n".join(problems)


@pytest.mark.parametrize("shuffle", [True, False])
def test_epoch_order_is_ffcvs_own(tmp_path, shuffle):
    """The memory backend batches in this order; it must be the order FFCV's Loader reads, epoch by epoch."""
    from ffcv.loader import Loader, OrderOption

    from data_prep.write import SourceData, write_dataset

    x = np.zeros((37, 1, 4, 4), np.uint8)
    y = np.arange(37) % 3
    write_dataset(tmp_path / "set", SourceData(x, y, x[:5], y[:5], ["a", "b", "c"], "none"), source_kind="test")
    indices = np.array([1, 4, 5, 9, 10, 20, 30, 36])
    loader = Loader(str(tmp_path / "set" / "train.beton"), batch_size=4, seed=11, indices=indices,
                    order=OrderOption.RANDOM if shuffle else OrderOption.SEQUENTIAL)
    for epoch in range(3):
        compat.set_next_epoch(loader, epoch)
        assert compat.next_epoch(loader) == epoch
        expected = loader.next_traversal_order()
        got = compat.epoch_order(indices, seed=11, epoch=epoch, shuffle=shuffle, distributed=False)
        np.testing.assert_array_equal(got, expected)
    assert sorted(got) == sorted(indices)


def test_fit_within_shrinks_the_long_side_only():
    image = np.zeros((300, 120, 3), np.uint8)
    assert compat.fit_within(image, 150).shape == (150, 60, 3)
    assert compat.fit_within(image, 400).shape == (300, 120, 3)  # never enlarged
