"""Start a run: validate, lay out RUN_DIR, then call the train loop here or on Ray Train workers."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import torch

from vpn_dist import compat
from vpn_dist.config import RunConfig, apply_overrides, from_dict, load_yaml, preset, resolved_gamma, validate
from vpn_dist.data import check_data
from vpn_dist.errors import Interrupted, TrainingFailed, UserError, os_error_text
from vpn_dist.evaluation import eval_loaders, evaluate_splits
from vpn_dist.observe import write_json_atomic
from vpn_dist.run_dir import RunDir
from vpn_dist.trainer import (autocast_for, check_batch_size, check_resumable, pick_device, train_loop,
                              trained_base)


def train(cfg: RunConfig, resume: bool = False, in_tune_trial: bool = False,
          verbose: bool = False) -> dict[str, Any]:
    """Run one training job to completion and return its final metrics (what metrics.json holds).

    Where it trains: in this process with `dist.workers` 0, or 1 inside a Ray Tune trial (`in_tune_trial`: the trial
    reserved the worker's resources, and each epoch reaches Tune); otherwise on `dist.workers` Ray Train workers
    (inside a trial, their reports reach Tune). `verbose` shows Ray Train's own INFO lines on the console (a report
    dump per rank and epoch, checkpoint notices); Ray's log files keep them either way.
    """
    validate(cfg)
    meta = check_data(cfg.data.path)  # header, counts, labels, shapes: damaged data stops before RUN_DIR exists
    run_dir = RunDir(Path(cfg.out).resolve())
    cfg.out, cfg.data.path = str(run_dir), str(Path(cfg.data.path).resolve())
    if cfg.train.init_from:
        cfg.train.init_from = str(Path(cfg.train.init_from).resolve())
        if cfg.vpn.mode == "generator-only":  # the trained base must be there before RUN_DIR is
            trained_base(cfg)
    cfg.vpn.gamma = resolved_gamma(cfg, meta["num_classes"])  # the paper's gamma, written out in config.yaml
    check_local_devices(cfg)
    check_batch_size(cfg, meta)
    # Every check before the first write: a refused run leaves RUN_DIR as it was (config.yaml included).
    with run_dir.hold():  # one process at a time in RUN_DIR, for the run's life
        if resume:
            found = run_dir.latest_state()
            if found is None:
                raise UserError(f"--resume {run_dir}: the run has no checkpoint yet; start it again without --resume")
            done, where = found
            if done.epoch >= cfg.train.epochs:
                raise UserError(f"--resume {run_dir}: the run already completed {done.epoch} of "
                                f"{cfg.train.epochs} epochs")
            check_resumable(cfg, meta, done, where)
        elif run_dir.has_readable_checkpoint():  # a run that stopped before its first checkpoint starts again
            raise UserError(f"run directory {run_dir} already holds a run; use --resume {run_dir} or another --out")
        in_this_process = cfg.dist.workers == 0 or (in_tune_trial and cfg.dist.workers == 1)
        need = None if in_this_process else ray_resources(cfg)
        with ray_session(num_cpus=cfg.dist.workers * cfg.dist.cpus_per_worker, need=need) if need else \
                contextlib.nullcontext():
            try:
                if resume:
                    run_dir.set_aside_unreadable()
                else:
                    run_dir.drop_unreadable()
                run_dir.write_config(cfg)
                invocation = uuid.uuid4().hex  # one id per call: Ray's restarts after a worker failure share it
                if in_this_process:
                    return train_loop(cfg, reports_to="tune" if in_tune_trial else "run_dir", invocation=invocation)
                write_storage_marker(run_dir, invocation)
                run_on_ray(cfg, invocation, in_tune_trial, verbose)
            except OSError as err:  # a full disk, a file system gone read-only: what survives, and how to go on
                if err.filename is None:  # TensorBoard's writer says what failed, not where: in RUN_DIR
                    err = OSError(err.errno, err.strerror or str(err), str(run_dir))
                raise TrainingFailed(f"{os_error_text(err)}; {way_on(run_dir)}") from None
            except Interrupted as err:
                raise Interrupted(f"{err}; {way_on(run_dir)}", err.signum) from None
            except KeyboardInterrupt:
                raise Interrupted(f"interrupted (Ctrl-C); {way_on(run_dir)}") from None
        return run_dir.read_metrics()


def check_local_devices(cfg: RunConfig) -> None:
    """A GPU asked of this machine must be here: refuse before anything starts, rather than train on the CPU unasked
    or wait for a device that will not come. (Ray workers' GPUs: `check_resources`.)"""
    if cfg.dist.workers == 0 and (cfg.train.device == "cuda" or cfg.dist.gpu) and not torch.cuda.is_available():
        asked = "train.device is cuda" if cfg.train.device == "cuda" else "--gpu (dist.gpu) without --workers"
        raise UserError(f"{asked}, but this machine has no GPU that PyTorch can use "
                        f"(torch.cuda.is_available() is false{_visible_devices()}); drop --gpu and set "
                        f"train.device=cpu to train on the CPU, or run where a GPU is")


def _visible_devices() -> str:
    shown = os.environ.get("CUDA_VISIBLE_DEVICES")
    return f", CUDA_VISIBLE_DEVICES={shown!r}" if shown is not None else ""


def way_on(run_dir: RunDir) -> str:
    """After a run stopped part-way: which checkpoint is whole, and the command that continues from it."""
    found = run_dir.latest_state()
    if found is None:
        return f"no epoch was checkpointed: start it again with the same command (--out {run_dir})"
    return (f"the run's checkpoints up to epoch {found[0].epoch} are whole: continue with "
            f"`vpn-dist train --resume {run_dir}`")


def local_ray_environment() -> None:
    """Keep a local Ray on loopback: its workers, and so DDP's MASTER_ADDR and gloo, use 127.0.0.1 instead of the
    host's address. Ray reads these when it is first imported, so the CLI calls this before anything imports Ray."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")


@contextlib.contextmanager
def ray_session(num_cpus: int = 0, need: dict[str, float] | None = None):
    """Ray for the `with` block: join the cluster at RAY_ADDRESS, or start a local Ray on loopback with at least
    `num_cpus` CPUs. At the end it stops only what it started: ray.shutdown() leaves a cluster running, and a Ray
    this process was already connected to (a Tune trial, an outer session) stays connected.

    need: what one job will ask Ray for (e.g. {"CPU": 4, "GPU": 2}): checked against this machine before a local Ray
    starts, and against the cluster once joined, so a request Ray could never place is refused with what there is
    instead of waiting for ever. A cluster that names no reachable Ray is refused within CLUSTER_WAIT_S.

    Enter it before anything imports Ray (a local Ray reads its loopback settings at import)."""
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        yield
        return
    address = os.environ.get("RAY_ADDRESS", "").strip()
    if not address:
        local_ray_environment()
        num_cpus = max(os.cpu_count() or 1, num_cpus)
        check_resources(need, local_resources(num_cpus), "this machine", "")
    import ray

    sigterm = signal.getsignal(signal.SIGTERM)
    try:
        if not address:
            compat.init_local_ray(num_cpus)
        else:
            join_cluster(address)
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, sigterm)  # ray.init installs its own; the CLI's cleans up on the way out
    try:
        if address:
            check_cluster(need, address)
        yield
    finally:
        ray.shutdown()


CLUSTER_WAIT_S = float(os.environ.get("VPN_DIST_CLUSTER_WAIT_S", "10"))  # for RAY_ADDRESS to answer


def local_resources(num_cpus: int = 0) -> dict[str, float]:
    """What a local Ray started here would have (it counts the GPUs CUDA shows, as PyTorch does)."""
    return {"CPU": max(os.cpu_count() or 1, num_cpus), "GPU": torch.cuda.device_count()}


def check_request(need: dict[str, float], what: str = "each run") -> None:
    """Before a command writes anything that depends on Ray (a sweep's or a grid's OUT): a local Ray could meet
    `need`, or RAY_ADDRESS answers (its resources are checked once joined, in ray_session)."""
    address = os.environ.get("RAY_ADDRESS", "").strip()
    if address:
        cluster_target(address)
    else:
        check_resources(need, local_resources(), "this machine", "", what)


def join_cluster(address: str) -> None:
    """ray.init() at RAY_ADDRESS, refused within CLUSTER_WAIT_S when nothing answers there. Ray itself would retry
    for a minute and more (a GCS address), or longer (`auto` finding a stale cluster), before it gave up."""
    import ray

    cluster_target(address)
    try:
        ray.init()
    except (Exception, SystemExit) as err:  # noqa: BLE001 - a version mismatch, a port that is not Ray's, ...
        raise UserError(f"cannot join the Ray cluster at RAY_ADDRESS={address}: {_first_line(err)}; "
                        f"{CLUSTER_FIX}") from None


CLUSTER_FIX = ("set RAY_ADDRESS to the cluster's GCS address (HEAD:6379), submit with `ray job submit`, or unset "
               "RAY_ADDRESS to run on a local Ray")


def cluster_target(address: str) -> str:
    """HOST:PORT of the cluster RAY_ADDRESS names, once something answers there within CLUSTER_WAIT_S."""
    fix = CLUSTER_FIX
    if address.startswith(("http://", "https://")):
        raise UserError(f"RAY_ADDRESS={address} is a Ray dashboard/Jobs API address (what `ray job submit` "
                        f"takes), not a cluster to join: {fix}")
    if address == "auto":
        try:
            target = compat.local_cluster_address()
        except Exception as err:  # noqa: BLE001 - Ray's lookup of a local cluster raises what it meets
            raise UserError(f"RAY_ADDRESS=auto finds no running Ray cluster on this machine ({_first_line(err)}): "
                            f"{fix}") from None
        if target is None:
            raise UserError(f"RAY_ADDRESS=auto finds no running Ray cluster on this machine: {fix}")
    else:
        target = address.removeprefix("ray://")
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"RAY_ADDRESS={address} is not a Ray address (HOST:PORT, ray://HOST:PORT or auto): {fix}")
    if not _answers(host.strip("[]"), int(port), CLUSTER_WAIT_S):
        raise UserError(f"RAY_ADDRESS={address}: nothing answers at {host}:{port} (waited {CLUSTER_WAIT_S:g} s; "
                        f"a stale export, or the cluster is down): {fix}")
    return target


def _answers(host: str, port: int, wait_s: float) -> bool:
    """Something accepts a TCP connection at host:port within wait_s (retried: a head node may be starting)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            with socket.create_connection((host, port), timeout=max(0.5, min(3.0, deadline - time.monotonic()))):
                return True
        except OSError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.5)


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def ray_resources(cfg: RunConfig) -> dict[str, float]:
    """What one Ray Train run of cfg reserves altogether."""
    need = {"CPU": cfg.dist.workers * cfg.dist.cpus_per_worker}
    if cfg.dist.gpu:
        need["GPU"] = cfg.dist.workers * cfg.dist.gpus_per_worker
    return need


def check_cluster(need: dict[str, float] | None, address: str) -> None:
    """On a joined cluster: the most it can hold (an autoscaling cluster's configured maximum) must meet `need`. A
    cluster whose autoscaler publishes no maximum is given the benefit of the doubt (Ray waits for its new nodes)."""
    if not need:
        return
    import ray

    try:
        most = compat.cluster_max_resources()
    except Exception:  # noqa: BLE001 - an older cluster without the autoscaler's record
        most = None
    if most is None and _has_autoscaler():
        return
    have = most if most is not None else ray.cluster_resources()
    check_resources(need, have, f"the Ray cluster at {address}",
                    " at its largest" if most is not None else "")


def _has_autoscaler() -> bool:
    """The cluster runs Ray's autoscaler (it publishes its status), so nodes it lacks now may come."""
    try:
        return compat.cluster_has_autoscaler()
    except Exception:  # noqa: BLE001
        return False


def check_resources(need: dict[str, float] | None, have: dict[str, float], where: str, qualifier: str,
                    what: str = "each run") -> None:
    """Refuse a request `where` cannot meet, naming what it has."""
    short = {k: v for k, v in (need or {}).items() if v > 0 and have.get(k, 0) + 1e-9 < v}
    if not short:
        return
    asked = ", ".join(f"{_amount(v)} {k}" for k, v in short.items())
    has = ", ".join(f"{_amount(have.get(k, 0))} {k}" for k in short)
    gpu = "GPU" in short
    way = ("drop --gpu (or --gpus-per-trial) to train on CPUs, or run where the GPUs are" if gpu else
           "ask for fewer workers or CPUs per worker (--workers, --cpus-per-worker), or add nodes")
    raise UserError(f"{what} needs {asked}, but {where} has {has}{qualifier}: {way}")


def _amount(value: float) -> str:
    return f"{value:g}"


def run_on_ray(cfg: RunConfig, invocation: str, in_tune_trial: bool = False, verbose: bool = False) -> None:
    """A Ray Train TorchTrainer: DDP over gloo (CPU) or nccl (GPU), a checkpoint per epoch, restarts on failure.

    With RAY_ADDRESS set (a cluster, or inside `ray job submit`) it joins that cluster; otherwise it starts a
    local Ray bound to 127.0.0.1 and stops it at the end.
    """
    # Ray Train turns a worker's print() into a log record that reaches the console by more than one path when
    # joining a cluster (each epoch line showed 2 to 4 times); plain prints arrive once. Ray passes this variable
    # on to the controller and the workers.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    with ray_session(num_cpus=cfg.dist.workers * cfg.dist.cpus_per_worker):
        import ray
        import ray.train
        from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer

        run_dir = RunDir(cfg.out)
        callbacks = []
        if in_tune_trial:  # the workers' per-epoch reports reach the trial, so ASHA sees them
            from ray.tune.integration.ray_train import TuneReportCallback

            callbacks.append(TuneReportCallback())
        trainer = TorchTrainer(
            train_on_ray_worker,
            train_loop_config={"run": cfg.to_dict(), "invocation": invocation, "verbose": verbose},
            scaling_config=ScalingConfig(num_workers=cfg.dist.workers, use_gpu=cfg.dist.gpu,
                                         resources_per_worker={"CPU": cfg.dist.cpus_per_worker} | (
                                             {"GPU": cfg.dist.gpus_per_worker} if cfg.dist.gpu else {})),
            torch_config=TorchConfig(backend="nccl" if cfg.dist.gpu else "gloo"),
            run_config=ray.train.RunConfig(  # Ray's: where Ray Train keeps the run (ours is the RunConfig given)
                name=run_dir.checkpoints.name, storage_path=str(run_dir), callbacks=callbacks,
                failure_config=FailureConfig(max_failures=cfg.train.max_failures),
                logging_config=LoggingConfig(log_level="INFO" if verbose else "WARNING"),
                checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints)),
        )
        dead_at_start = {node["NodeID"] for node in ray.nodes() if not node["Alive"]}
        # a local Ray (no RAY_ADDRESS, one node: the driver's own) has no node to lose
        cluster = bool(os.environ.get("RAY_ADDRESS")) or len(ray.nodes()) > 1
        try:
            trainer.fit()
        except ray.train.TrainingFailedError as err:
            lost = _lost_nodes(dead_at_start) if cluster and not _stopped_by_our_checks(err) else ""
            raise TrainingFailed(f"the Ray Train run failed: {lost}{_worker_errors(err)}{_resume_hint(run_dir)}") \
                from None


def train_on_ray_worker(config: dict[str, Any]) -> None:
    """What Ray Train runs on each worker. Ray passes one dict: the run config, the call's id, --verbose."""
    if not config["verbose"]:
        compat.hide_ray_train_report_dumps()
    cfg = from_dict(config["run"])
    check_storage_marker(RunDir(cfg.out), config["invocation"])
    train_loop(cfg, reports_to="ray_train", invocation=config["invocation"])


def write_storage_marker(run_dir: RunDir, invocation: str) -> None:
    """The driver's note in RUN_DIR for this call: a worker that cannot read it back writes to another disk."""
    write_json_atomic(run_dir.storage_marker, {"invocation": invocation, "driver_host": socket.gethostname()})


def check_storage_marker(run_dir: RunDir, invocation: str) -> None:
    """Stop before training when this worker does not see the driver's RUN_DIR: on a cluster RUN_DIR must be
    storage every node shares (checkpoints, metrics.json and recovery all go through it; cluster/README.md)."""
    path = run_dir.storage_marker
    try:
        seen = json.loads(path.read_text()).get("invocation")
    except (OSError, ValueError):
        seen = None
    if seen != invocation:
        import ray

        node = f"{socket.gethostname()} ({ray.util.get_node_ip_address()})"
        found = "is missing" if seen is None else "holds another run's marker"
        raise UserError(f"node {node} does not see the run directory the driver wrote: {path} {found}. "
                        f"RUN_DIR must be on storage every node mounts at the same path (NFS, a shared volume); "
                        f"see cluster/README.md")


# Workers see a lost node at once (their gloo or NCCL peer's connection closes); Ray declares the node dead only
# after its health checks fail (about 15 s with Ray's defaults), so a failed run waits up to this long for that verdict.
NODE_LOSS_WAIT_S = 30.0


def _lost_nodes(dead_at_start: set[str], wait_s: float = NODE_LOSS_WAIT_S) -> str:
    """'node IP (id ID) was lost: why; ' for each node that died during the run (nodes that joined later too).
    A node the autoscaler removed for being idle held no worker of the run, so it is not named."""
    import ray

    deadline = time.monotonic() + wait_s
    while True:
        lost = [node for node in ray.nodes() if not node["Alive"] and node["NodeID"] not in dead_at_start
                and not compat.drained_for_idleness(node)]
        if lost or time.monotonic() >= deadline:
            return "".join(f"node {node['NodeManagerAddress']} (id {node['NodeID']}) was lost"
                           f"{': ' + node['DeathReasonMessage'] if node.get('DeathReasonMessage') else ''}; "
                           for node in lost)
        time.sleep(1)


def _stopped_by_our_checks(err: Exception) -> bool:
    """Every failed rank stopped in vpn-dist's own checks (a diverged loss, RUN_DIR not shared): no node was lost,
    so the error needs no wait for Ray's verdict on nodes."""
    failures = getattr(err, "worker_failures", None) or {}
    ours = (UserError, TrainingFailed, FloatingPointError)
    return bool(failures) and all(isinstance(compat.worker_exception(failure), ours)
                                  for failure in failures.values())


def _resume_hint(run_dir: RunDir) -> str:
    """How to continue, when a checkpoint reads back whole. Ray Train copies each checkpoint into RUN_DIR, so a node
    lost during the copy leaves one cut short; with none whole, the same command starts the run again."""
    if run_dir.latest_state() is None:
        return ""
    return f"\nits checkpoints are kept: continue with `vpn-dist train --resume {run_dir}`"


def _worker_errors(err: Exception) -> str:
    """One line per failed rank (the last line of its traceback), instead of Ray's full report."""
    failures = getattr(err, "worker_failures", None) or {"controller": getattr(err, "controller_failure", err)}
    lines = []
    for rank, failure in sorted(failures.items(), key=lambda item: str(item[0])):
        text = [line for line in str(failure).splitlines() if line.strip()]
        lines.append(f"rank {rank}: {text[-1].strip() if text else type(failure).__name__}")
    return "; ".join(lines)


def evaluate_run(run_dir: str | Path, data_dir: str | None = None, top_k: int | None = None) -> dict[str, Any]:
    """Recompute the test (and validation) metrics from a run's newest checkpoint; writes RUN_DIR/eval.json.
    top_k: Algorithm 2 over the top_k classes of h(x) (default: the run's train.alg2_top_k; 0 is exact)."""
    run_dir = RunDir(run_dir)
    cfg = run_dir.read_config()
    cfg.out = str(run_dir)
    if data_dir:
        cfg.data.path = str(data_dir)
    validate(cfg)  # a hand-edited config.yaml gets the same checks as a new run
    if top_k is not None:
        if top_k < 0:
            raise UserError(f"--alg2-top-k {top_k} must be >= 0 (0: exact Algorithm 2)")
        cfg.train.alg2_top_k = top_k
    device = pick_device(cfg)
    trained = run_dir.trained(cfg, device)
    meta = check_data(cfg.data.path)
    trained.check_data(meta, cfg.data.path)
    torch.manual_seed(cfg.train.seed)
    result: dict[str, Any] = {"checkpoint": str(trained.checkpoint), "epoch": trained.state.epoch}
    result |= evaluate_splits(trained.base, trained.generator, eval_loaders(cfg, meta, device),
                              num_classes=meta["num_classes"], gamma=trained.gamma, bound=cfg.vpn.bound, C=cfg.vpn.C,
                              autocast=autocast_for(cfg.train.amp, device), top_k=cfg.train.alg2_top_k)
    result["alg2_top_k"] = cfg.train.alg2_top_k
    try:
        run_dir.write_eval(result)
    except OSError as err:  # a finished run on a read-only share: the results still count, printed only
        print(f"note: {run_dir.eval} was not written ({err.strerror or err}); the results are printed only",
              file=sys.stderr, flush=True)
    return result


def config_from_args(config_file: str | None, flags: dict[str, Any], overrides: list[str],
                     base: RunConfig | None = None, preset_name: str | None = None) -> RunConfig:
    """defaults < --preset < --config FILE < explicit flags < --set key=value (a resumed run's own config is the
    base, and takes no preset)."""
    if preset_name is not None:
        if base is not None:
            raise UserError("--resume keeps the run's settings: drop --preset")
        base = preset(preset_name)
    cfg = load_yaml(config_file, base) if config_file else (base or RunConfig())
    cfg = from_dict({k: v for k, v in flags.items() if v is not None}, cfg)
    return apply_overrides(cfg, overrides)
