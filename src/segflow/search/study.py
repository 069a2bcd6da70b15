"""An Optuna study shared by parallel, killable workers: storage, sampler, pruner, bookkeeping.

Storage: by default one journal file per study (Optuna's ``JournalStorage`` over a
``JournalFileBackend`` with its symlink lock, which is safe on NFS, unlike SQLite), under the
results folder; ``search.<study>.storage`` may name any Optuna storage URL instead
(``postgresql://...``, ``mysql://...``, ``sqlite:///...`` for one machine).

Workers record who runs a trial (user attributes ``worker_host``, ``worker_pid``) and keep a
heartbeat (``heartbeat``, seconds since the epoch, renewed every ``heartbeat_seconds``). A
RUNNING trial whose worker is gone is *stale*: on this host, its process no longer exists; on
another, its heartbeat is older than :data:`STALE_HEARTBEATS` intervals. :func:`fail_stale`
marks stale trials FAIL, so a killed trial is never a result, and the study's count of
finished trials is what the next worker makes up. :func:`load_study` opens a study by its name
(the config's study id and :func:`data_key`), for the workers and search-summary.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from segflow.core.errors import SegflowError
from segflow.search.space import direction

STALE_HEARTBEATS = 4  # heartbeat intervals without a beat before another host's trial is stale
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def open_storage(
    storage: str | None, journal: str | os.PathLike[str]
) -> optuna.storages.BaseStorage:
    """The study's storage: an Optuna storage URL, or the journal file.

    Args:
        storage: ``search.<study>.storage`` (an Optuna storage URL), or None.
        journal: the journal file used when ``storage`` is None.

    Returns:
        The storage object.
    """
    if storage:
        return optuna.storages.get_storage(storage)
    from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock

    path = Path(journal)
    path.parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.JournalStorage(
        JournalFileBackend(str(path), lock_obj=JournalFileSymlinkLock(str(path)))
    )


@contextlib.contextmanager
def study_lock(path: str | os.PathLike[str]) -> Iterator[None]:
    """Hold the study's lock (a symlink lock next to the journal: NFS-safe) while a worker
    decides whether to start a trial, so workers never start more than ``n_trials``."""
    from optuna.storages.journal import JournalFileSymlinkLock

    lock = JournalFileSymlinkLock(str(path))
    while not lock.acquire():
        time.sleep(0.05)
    try:
        yield
    finally:
        lock.release()


def make_sampler(name: str, seed: int, space: dict[str, Any]) -> optuna.samplers.BaseSampler:
    """The study's sampler, seeded (``grid``: the product of the choice lists)."""
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed)
    if name == "grid":
        grid = {path: _categorical(list(spec["choice"])) for path, spec in space.items()}
        return _WorkerGridSampler(grid, seed=seed)
    raise SegflowError(f"search sampler: unknown {name!r}")


class _WorkerGridSampler(optuna.samplers.GridSampler):
    """Optuna's grid sampler without its ``study.stop()`` once the grid is covered (which only
    works inside ``study.optimize``): the workers stop at ``n_trials``; past the grid's size a
    trial repeats a grid point."""

    def after_trial(
        self,
        study: optuna.Study,
        trial: optuna.trial.FrozenTrial,
        state: TrialState,
        values: Any,
    ) -> None:
        """Nothing: :func:`segflow.search.search_worker.run_worker` decides when to stop."""


def make_pruner(name: str, startup_trials: int, max_steps: int) -> optuna.pruners.BasePruner:
    """The study's pruner over each epoch's validation score (``max_steps``: a trial's epochs
    over all its folds)."""
    if name == "none":
        return optuna.pruners.NopPruner()
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=startup_trials, n_warmup_steps=0)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(1, max_steps))
    raise SegflowError(f"search pruner: unknown {name!r}")


def suggest(trial: optuna.trial.Trial, space: dict[str, Any]) -> dict[str, Any]:
    """One value per field of the space (dotted path -> value)."""
    params: dict[str, Any] = {}
    for path, spec in space.items():
        ((kind, values),) = spec.items()
        if kind == "uniform":
            params[path] = trial.suggest_float(path, values[0], values[1])
        elif kind == "log_uniform":
            params[path] = trial.suggest_float(path, values[0], values[1], log=True)
        elif kind == "int_uniform":
            params[path] = trial.suggest_int(path, values[0], values[1])
        else:
            params[path] = trial.suggest_categorical(path, _categorical(values))
            if isinstance(params[path], str) and params[path].startswith(_JSON):
                import json

                params[path] = json.loads(params[path][len(_JSON) :])
    return params


_JSON = "json:"


def _categorical(values: list[Any]) -> list[Any]:
    """Optuna's categorical values are None, bool, int, float or str: others (lists, mappings)
    travel as ``json:<text>``."""
    import json

    simple = (type(None), bool, int, float, str)
    return [v if isinstance(v, simple) else _JSON + json.dumps(v, sort_keys=True) for v in values]


def counts(study: optuna.Study) -> dict[str, int]:
    """The study's trials by state name (COMPLETE, PRUNED, FAIL, RUNNING, WAITING)."""
    result = {state.name: 0 for state in TrialState}
    for trial in study.get_trials(deepcopy=False):
        result[trial.state.name] += 1
    return result


def finished(study: optuna.Study) -> int:
    """COMPLETE + PRUNED trials: what counts towards ``n_trials``."""
    return len(study.get_trials(deepcopy=False, states=FINISHED))


def worker_identity() -> dict[str, Any]:
    """This process as recorded on the trials it runs."""
    return {"worker_host": socket.gethostname(), "worker_pid": os.getpid()}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (killed, not yet reaped by its parent) runs nothing.
    with contextlib.suppress(OSError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        if fields[0] == "Z":
            return False
    return True


def is_stale(trial: optuna.trial.FrozenTrial, heartbeat_seconds: float, now: float) -> bool:
    """Whether a RUNNING trial's worker is gone (see the module docstring)."""
    attrs = trial.user_attrs
    host, pid = attrs.get("worker_host"), attrs.get("worker_pid")
    if host is None or pid is None:  # asked but not yet claimed: judge by its start
        started = trial.datetime_start.timestamp() if trial.datetime_start else now
        return now - started > STALE_HEARTBEATS * heartbeat_seconds
    if host == socket.gethostname():
        return not _alive(int(pid))
    beat = float(attrs.get("heartbeat", 0.0))
    return now - beat > STALE_HEARTBEATS * heartbeat_seconds


def fail_stale(study: optuna.Study, heartbeat_seconds: float) -> list[int]:
    """Mark the RUNNING trials of dead workers FAIL (``failed_reason``: worker gone).

    Returns:
        The numbers of the trials marked.
    """
    now = time.time()
    storage = study._storage  # Optuna has no public handle to it; its methods are public
    marked = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if not is_stale(trial, heartbeat_seconds, now):
            continue
        trial_id = storage.get_trial_id_from_study_id_trial_number(
            storage.get_study_id_from_name(study.study_name), trial.number
        )
        with contextlib.suppress(RuntimeError, optuna.exceptions.UpdateFinishedTrialError):
            storage.set_trial_user_attr(
                trial_id, "failed_reason", "worker gone (killed or lost) during the trial"
            )
            if storage.set_trial_state_values(trial_id, TrialState.FAIL):
                marked.append(trial.number)
    return marked


class Heartbeat:
    """Renews a trial's ``heartbeat`` user attribute every ``seconds`` from a thread."""

    def __init__(self, trial: optuna.trial.Trial, seconds: float) -> None:
        self.trial, self.seconds = trial, seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.seconds):
            with contextlib.suppress(Exception):  # a finished trial takes no more attributes
                self.trial.set_user_attr("heartbeat", time.time())

    def __enter__(self) -> Heartbeat:
        self.trial.set_user_attr("heartbeat", time.time())
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def data_key(arrays_dir: str | Path, folds_csv: str | Path) -> str:
    """8 hex digits of the data a study's trials train on (stats.json and folds.csv): other
    data starts another Optuna study in the same storage."""
    digest = hashlib.sha256()
    for path in (Path(arrays_dir) / "stats.json", Path(folds_csv)):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:8]


def optuna_study_name(study_id: str, arrays_dir: str | Path, folds_csv: str | Path) -> str:
    """The Optuna study name: the config's study id and the data key."""
    return f"{study_id}.{data_key(arrays_dir, folds_csv)}"


def load_study(
    search: dict[str, Any], arrays_dir: str | Path, folds_csv: str | Path, worker: int = 0
) -> optuna.Study:
    """Create or load the study that ``search`` (the worker's JSON) describes.

    The sampler is seeded with ``seed + worker``: workers sharing a seed would propose the
    same first trials.
    """
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = open_storage(search["storage"], search["journal"])
    epochs = search["trial_epochs"]
    return optuna.create_study(
        storage=storage,
        study_name=optuna_study_name(search["study_id"], arrays_dir, folds_csv),
        sampler=make_sampler(search["sampler"], int(search["seed"]) + worker, search["space"]),
        pruner=make_pruner(
            search["pruner"], search["pruner_startup_trials"], epochs * len(search["folds"])
        ),
        direction=direction(search["experiment"]),
        load_if_exists=True,
    )
