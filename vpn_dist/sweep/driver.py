"""The one place that runs a set of trials on Ray Tune, with resume; and the trial body that runs one vpn-dist run
inside a trial. `vpn-dist tune` (ASHA on a search space) and a grid with no early stopping both sit on it.

Ray is imported only inside these functions, within `ray_session` (a local Ray stays on loopback).
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import threading
import traceback
from pathlib import Path
from typing import Any, Callable

from vpn_dist.config import RunConfig
from vpn_dist.errors import UserError, free_space
from vpn_dist.sweep.storage import atomic_local_filesystem
from vpn_dist.sweep.trial import TrialResources

# A trial of one worker trains in its own process and reserves that worker's resources. A trial of more only drives a
# Ray Train run (it and the Train controller need no CPU; the Train workers reserve the CPUs and GPUs), and Ray refuses
# an empty resource request, so it asks for a little memory (a logical reservation).
DRIVER_RESOURCES = {"CPU": 0, "memory": 256 * 1024**2}


def run_trials(trial: Callable[[dict], None], param_space: dict[str, Any], out: Path, *, resume: bool,
               resources: TrialResources, max_concurrent: int | None = None, max_failures: int = 0,
               asha: dict[str, Any] | None = None,
               metric: str | None = None, num_samples: int = 1, experiment: str = "tune",
               callbacks: list | None = None, ordered: list[tuple[dict[str, Any], set[int]]] | None = None,
               asha_history: list[list[dict[str, Any]]] | None = None, verbose: int = 1) -> list:
    """Run `trial(params)` for every point of `param_space` (x num_samples) as the Tune experiment OUT/<experiment>,
    or continue the one there (`resume`: finished trials are not rerun, errored ones not retried). A failing trial
    is recorded and the others go on. Returns the trials as saved on disk (`tune.ExperimentAnalysis(...).trials`).

    resources: what one trial's training reserves (its workers, their CPUs and GPUs); max_concurrent=None runs as
      many trials at once as the cluster holds of these. `trial` must train through `train_in_trial`, which runs a
      one-worker trial in the trial's own process, as reserved here.
    max_failures: restarts of a one-worker trial whose process died (it resumes from its checkpoint); a trial of
      more workers has Ray Train restart them instead (train.max_failures).
    asha: ASHAScheduler keyword arguments (early stopping on `metric`, maximized); None runs every trial to its end.
    callbacks: Tune callbacks (e.g. to record each trial as it ends); a restored experiment keeps the pickled
      ones it started with.
    ordered: instead of `param_space`, each trial's params in the order to start them, with the indices of the
      trials it waits for (see `_in_order`).
    asha_history: the per-epoch results (e.g. {"epoch": 5, "val_acc": 0.8}) of trials that finished outside this
      experiment (an earlier session), one list per trial: ASHA's rungs start with them (see `_asha`).
    verbose: Tune's console output (0: none, for callers that print their own line per trial; 1: status tables).

    A disk that fills during the trials ends the call with OSError(ENOSPC) naming OUT: what Tune saved is whole (see
    vpn_dist.sweep.storage), and `resume` then runs again the trials that the full disk failed.
    """
    from vpn_dist.launch import ray_session

    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "5")  # experiment state on disk at least every 5 s
    state = out / experiment
    storage = atomic_local_filesystem()
    train_resources = resources.reserved()
    with ray_session(num_cpus=int(train_resources.get("CPU", 0)), need=train_resources):
        import ray
        from ray import tune

        trainable = tune.with_resources(trial, train_resources if resources.in_trial_process else DRIVER_RESOURCES)
        if resume:
            if not tune.Tuner.can_restore(str(state), storage_filesystem=storage):
                raise UserError(f"--resume: {state} holds no Tune experiment state yet; start again without "
                                f"--resume (remove {out})")
            saved = tune.ExperimentAnalysis(str(state), storage_filesystem=storage).trials
            tuner = tune.Tuner.restore(str(state), trainable=trainable, storage_filesystem=storage,
                                       resume_unfinished=True, restart_errored=any(
                                           failed_for_space(t, or_unknown=True) for t in saved))
        else:
            concurrent = max_concurrent or default_concurrency(ray.cluster_resources(), train_resources)
            search_alg = _in_order(*zip(*ordered)) if ordered else None
            num_samples = len(ordered) if ordered else num_samples
            tuner = tune.Tuner(
                trainable, param_space=param_space,
                tune_config=tune.TuneConfig(metric=metric, mode="max" if metric else None, num_samples=num_samples,
                                            search_alg=search_alg, max_concurrent_trials=concurrent,
                                            scheduler=_asha(asha, asha_history) if asha else None),
                run_config=tune.RunConfig(name=experiment, storage_path=str(out), storage_filesystem=storage,
                                          callbacks=callbacks,
                                          failure_config=tune.FailureConfig(
                                              max_failures=max_failures if resources.in_trial_process else 0,
                                              fail_fast=False),
                                          verbose=verbose))
            print(f"{concurrent} trial(s) at a time, each reserving {train_resources}; Tune state in {state}",
                  flush=True)
        try:
            with sigterm_stops_like_ctrl_c():
                tuner.fit()
            # The statuses as saved on disk: after Ctrl-C the in-memory trials all read TERMINATED, while the saved
            # state keeps the unfinished ones PENDING (what resume runs).
            trials = list(tune.ExperimentAnalysis(str(state), storage_filesystem=storage).trials)
        except Exception as err:  # Tune reading back what a full disk cut short: say so, not Tune's traceback
            if out_of_space(out, "".join(traceback.format_exception(err))):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(out)) from None
            raise
        if any(map(failed_for_space, trials)) or (
                out_of_space(out, "") and any(failed_for_space(t, or_unknown=True) for t in trials)):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(out))
        return trials


def out_of_space(out: Path, error_text: str) -> bool:
    """Whether an error (its whole text) came of a full file system, or OUT's file system is full now."""
    free = free_space(out)
    return names_full_disk(error_text) or (free is not None and free < 1 << 20)


def names_full_disk(text: str) -> bool:
    return any(words in text for words in ("No space left on device", "Disk quota exceeded",
                                           f"[Errno {errno.ENOSPC}]", f"[Errno {errno.EDQUOT}]"))


def failed_for_space(trial, *, or_unknown: bool = False) -> bool:
    """A trial that errored because the disk filled (its error says so; `or_unknown`: or its error was never saved
    whole, as when the disk was full when Tune wrote it)."""
    from vpn_dist.sweep.report import error_text

    if str(getattr(trial, "status", "")) != "ERROR":
        return False
    text = error_text(trial)
    return names_full_disk(text) or (or_unknown and text == "unknown error")


def _asha(asha: dict[str, Any], history: list[list[dict[str, Any]]] | None):
    """ASHAScheduler(**asha) whose rungs already hold `history` when the first trial arrives, so a continued search
    judges its new trials against the finished ones as one uninterrupted run would have. Replayed through the
    scheduler's own hooks (a stand-in trial per finished one): a rung records a trial's metric at the first result at
    or past its milestone, whatever order the trials come in."""
    from types import SimpleNamespace

    from ray.tune.schedulers import ASHAScheduler

    class ReplayingASHA(ASHAScheduler):
        def __init__(self):
            super().__init__(**asha)
            self.to_replay = list(history or [])

        def on_trial_add(self, tune_controller, trial) -> None:
            for n, results in enumerate(self.to_replay):
                finished = SimpleNamespace(trial_id=f"finished-earlier-{n}")
                super().on_trial_add(tune_controller, finished)
                for result in results:
                    super().on_trial_result(tune_controller, finished, result)
                super().on_trial_remove(tune_controller, finished)
            self.to_replay = []
            super().on_trial_add(tune_controller, trial)

    return ReplayingASHA()


@contextlib.contextmanager
def sigterm_stops_like_ctrl_c():
    """While Tune runs: SIGTERM (a job stopped, a node drained) ends the trials as Ctrl-C does, through Tune's own
    graceful stop (SIGUSR1), so that its state is saved and the command prints the way on; a second SIGTERM stops at
    once, by the handler the command had."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum, frame):
        signal.signal(signal.SIGTERM, previous)
        signal.raise_signal(signal.SIGUSR1)

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _in_order(points: tuple[dict[str, Any], ...], waits_for: tuple[set[int], ...]):
    """A Tune searcher that proposes `points` in their order, each only once the points it waits for (indices into
    `points`) have finished. A point never waits behind one that cannot start yet, so every free slot is used; one
    whose prerequisite failed is never proposed, and the search ends when nothing left can start."""
    from ray.tune.search import Searcher

    class InOrder(Searcher):
        def __init__(self):
            super().__init__()
            self.waiting = list(range(len(points)))
            self.running: dict[str, int] = {}  # trial id -> point
            self.finished: set[int] = set()

        def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
            ready = next((i for i in self.waiting if waits_for[i] <= self.finished), None)
            if ready is None:  # the rest wait for a running point, or for one that failed (then nothing will come)
                return None if self.running else Searcher.FINISHED
            self.waiting.remove(ready)
            self.running[trial_id] = ready
            return dict(points[ready])

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
            point = self.running.pop(trial_id, None)
            if point is not None and not error:
                self.finished.add(point)

        def save(self, checkpoint_path: str) -> None:  # Tune snapshots the searcher with the experiment
            state = {"waiting": self.waiting, "running": self.running, "finished": sorted(self.finished)}
            Path(checkpoint_path).write_text(json.dumps(state))

        def restore(self, checkpoint_path: str) -> None:
            state = json.loads(Path(checkpoint_path).read_text())
            self.waiting, self.running, self.finished = state["waiting"], state["running"], set(state["finished"])

    return InOrder()


def default_concurrency(cluster: dict[str, float], train_resources: dict[str, float]) -> int:
    """How many trials' Ray Train workers the cluster holds at once (at least 1)."""
    fits = [int(cluster.get(key, 0) / need) for key, need in train_resources.items() if need > 0]
    return max(1, min(fits, default=1))


def train_in_trial(cfg: RunConfig) -> None:
    """Run one vpn-dist run as the current Tune trial: its per-epoch reports reach Tune. One worker trains here, in
    the trial's process (what `run_trials` reserved for it); more are a Ray Train run this trial drives. A run whose
    metrics.json already has all its epochs (the sweep was interrupted after it finished) replays them instead of
    retraining; one with a checkpoint first replays the epochs it holds, then resumes from it: ASHA judges a trial
    once per rung, at its first report past the rung, so a resumed trial that skipped its rung's epoch would be judged
    later in its schedule, on a better accuracy than the other trials were."""
    from vpn_dist.launch import train
    from vpn_dist.run_dir import RunDir

    run_dir = RunDir(cfg.out)
    done = run_dir.read_metrics() or {}
    if done.get("epochs_completed", 0) >= cfg.train.epochs:
        _report_again(done.get("history", []))
        return
    found = run_dir.latest_state()
    if found is not None:
        _report_again(found[0].history)
    train(cfg, resume=found is not None, in_tune_trial=True)


def _report_again(history: list[dict[str, Any]]) -> None:
    from ray import tune

    for epoch_metrics in history:
        tune.report({k: v for k, v in epoch_metrics.items() if isinstance(v, (int, float, str, bool)) or v is None})
