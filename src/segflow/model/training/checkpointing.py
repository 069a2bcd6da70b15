"""Resume state of fold training, weight averages (EMA, SWA, top-k snapshots) and BatchNorm
recalibration.

``resume_dir/last.pt`` holds the complete training state after the last finished epoch (written
by :func:`save_resume`), the running SWA average (:class:`WeightAverage`) included; the top-k
epochs' evaluated weights sit next to it as ``snapshot_eNNNN.pt`` and a snapshot ensemble's
cycle ends as ``cycle_eNNNN.pt`` (:class:`Snapshot`). All are plain ``torch.save`` files of
tensors and builtin types, read back with ``weights_only=True``. A resume file is used only when
its :func:`config_hash` matches: every option except :data:`RESUME_EXEMPT`, the model, loss,
augmentation, the data (:func:`data_fingerprint`) and the checkpoint training started from
(``train.init_from``).

An average of weights has the average of the snapshots' BatchNorm statistics, which are not the
statistics of the averaged network's own activations; :func:`recalibrate_batchnorm` recomputes
them with one pass over training batches (as ``torch.optim.swa_utils.update_bn`` does).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from segflow.core.atomic import remove_stale_temporaries, write_torch
from segflow.core.errors import SegflowError
from segflow.core.late_options import published_options
from segflow.core.stage_args import options_hash
from segflow.model.datasets import SegmentationArrays
from segflow.model.models import ModelSpec
from segflow.model.training.train_options import TrainOptions

log = logging.getLogger(__name__)

# Options that may differ between a run and its resumption (see segflow.model.training.train): how long, where,
# and what to do about a non-finite loss (so a fold stopped by one can resume with skip_batch).
RESUME_EXEMPT = (
    "epochs",
    "early_stopping_patience",
    "num_workers",
    "device",
    "nonfinite_loss",
    "max_skipped_fraction",
)
RESUME_FORMAT = "segflow-resume-1"
RESUME_FILE = "last.pt"
# Files next to last.pt: top-k snapshots, snapshot-ensemble cycle ends (remove_resume_state).
SNAPSHOT_PATTERNS = ("snapshot_e*.pt", "cycle_e*.pt")


@dataclass
class Snapshot:
    """One of the top-k epochs: its monitor value and weights file."""

    epoch: int
    value: float  # the monitor's value
    file: str  # name inside resume_dir


class Ema:
    """Exponential moving average of every float entry of a model's state dict.

    The decay warms up as min(decay, (1 + n) / (10 + n)) after n updates, so that short runs are
    not dominated by the random initialisation. Integer buffers (BatchNorm's batch counter) are
    copied.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        """Start the average at a frozen copy of ``model``.

        Args:
            model: the trained model (copied, in eval mode, without gradients).
            decay: the decay per update once warmed up, in (0, 1).
        """
        self.decay = decay
        self.updates = 0
        self.model = copy.deepcopy(model).eval()
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average towards ``model``'s current weights (after an optimizer step).

        Args:
            model: the trained model (same architecture as the average).
        """
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        source = model.state_dict()
        for name, value in self.model.state_dict().items():
            if value.dtype.is_floating_point:
                value.lerp_(source[name], 1 - decay)
            else:
                value.copy_(source[name])


class WeightAverage:
    """Equal running average of a model's end-of-epoch weights (stochastic weight averaging).

    Every float entry of the state dict is averaged as ``torch.optim.swa_utils.AveragedModel``
    does, ``avg += (w - avg) / (n + 1)``, on the CPU in the entry's dtype (BatchNorm statistics
    too: :func:`recalibrate_batchnorm` replaces them before use); integer buffers (BatchNorm batch
    counters) are the latest. The average and the epochs in it live in the resume state, so a
    resumed run continues the same average.
    """

    def __init__(self) -> None:
        self.average: dict[str, torch.Tensor] | None = None
        self.epochs: list[int] = []

    @torch.no_grad()
    def update(self, model: nn.Module, epoch: int) -> None:
        """Add ``model``'s current weights as the end of ``epoch``.

        Args:
            model: the trained model.
            epoch: the epoch just finished (1-based).
        """
        current = cpu_state(model)
        if self.average is None:
            self.average = current
        else:
            count = len(self.epochs)
            for name, value in self.average.items():
                if value.dtype.is_floating_point:
                    value += (current[name] - value) / (count + 1)
                else:
                    self.average[name] = current[name]
        self.epochs.append(epoch)

    def state_dict(self) -> dict[str, Any]:
        """The average and its epochs, for the resume file."""
        return {"average": self.average, "epochs": list(self.epochs)}

    def load_state_dict(self, state: Mapping[str, Any] | None) -> None:
        """Continue from :meth:`state_dict` (None: an empty average)."""
        state = state or {}
        self.average = state.get("average")
        self.epochs = [int(epoch) for epoch in state.get("epochs", [])]


@torch.no_grad()
def recalibrate_batchnorm(
    model: nn.Module,
    batches: Iterable[Any],
    device: torch.device | str | None = None,
    forward: Callable[[nn.Module, torch.Tensor], Any] | None = None,
) -> int:
    """Recompute every BatchNorm layer's running statistics from one pass over ``batches``.

    As ``torch.optim.swa_utils.update_bn``: the statistics are reset and, with momentum None,
    become the plain mean over the batches of each batch's mean and (unbiased) variance, from
    forward passes in training mode without gradients. The weights do not change. Deterministic
    when ``batches`` is (a loader reseeded beforehand). Models without BatchNorm are left as
    they are, without a pass.

    Args:
        model: the model (its BatchNorm layers' buffers are overwritten); its train/eval mode
            is restored afterwards.
        batches: an iterable of image tensors, of dicts with an ``"image"`` tensor (segflow's
            loaders) or of tuples whose first item is the images.
        device: where to move each batch (None: as it comes).
        forward: ``forward(model, images)`` to run instead of ``model(images)`` (padding,
            autocast).

    Returns:
        The number of batches run (0 without BatchNorm layers).

    Raises:
        SegflowError: ``batches`` is empty (the old statistics are then kept).
    """
    norms = [
        module
        for module in model.modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats
    ]
    if not norms:
        return 0
    saved = [
        (m.momentum, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
        for m in norms
    ]
    was_training = model.training
    for module in norms:
        module.reset_running_stats()
        module.momentum = None  # cumulative average: every batch counts the same
    model.train()
    count = 0
    try:
        for batch in batches:
            if isinstance(batch, Mapping):
                images = batch["image"]
            elif isinstance(batch, tuple | list):
                images = batch[0]
            else:
                images = batch
            if device is not None:
                images = images.to(device, non_blocking=True)
            if forward is not None:
                forward(model, images)
            else:
                model(images)
            count += 1
        if count == 0:
            raise SegflowError("BatchNorm recalibration: no training batches to run")
    except BaseException:
        for module, (_, mean, var, tracked) in zip(norms, saved, strict=True):
            module.running_mean.copy_(mean)
            module.running_var.copy_(var)
            module.num_batches_tracked.copy_(tracked)
        raise
    finally:
        for module, (momentum, *_) in zip(norms, saved, strict=True):
            module.momentum = momentum
        model.train(was_training)
    return count


def cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of ``model``'s state dict on the CPU (safe to save while training goes on).

    Args:
        model: any module.

    Returns:
        name -> detached CPU tensor.
    """
    return {name: value.detach().to("cpu", copy=True) for name, value in model.state_dict().items()}


def first_nonfinite(state: Mapping[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point tensor of ``state`` holding NaN or inf, or None.

    Args:
        state: a state dict (any device; one device sync for the whole dict).

    Returns:
        The tensor's name, or None when every entry is finite.
    """
    names = [name for name, value in state.items() if value.dtype.is_floating_point]
    if not names:
        return None
    finite = torch.stack([torch.isfinite(state[name]).all() for name in names]).cpu()
    bad = torch.nonzero(~finite).flatten()
    return names[int(bad[0])] if len(bad) else None


def rng_state() -> dict[str, Any]:
    """The states of Python's, numpy's, torch's and (if initialised) CUDA's global generators.

    Returns:
        Plain types and tensors only: the resume file is read back with ``weights_only=True``.
    """
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
    }


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore the generators from :func:`rng_state` (CUDA's only where CUDA is available).

    Args:
        state: a :func:`rng_state` result, possibly after a save/load round trip.
    """
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def config_hash(
    options: TrainOptions,
    model_spec: ModelSpec,
    fold: int | str,
    loss_weights: Mapping[str, Any],
    ohem_fraction: float | None,
    augment: Any,
    data: Mapping[str, Any],
    init_checkpoint: str | None = None,
) -> str:
    """The identity of a training configuration, guarding resume (options but RESUME_EXEMPT).

    Args:
        options: training options; those in :data:`RESUME_EXEMPT` are left out.
        model_spec: the model.
        fold: the validation fold, or ``"full"`` for a full-data refit.
        loss_weights: loss term -> weight, or -> ``{weight, <option>: value}``.
        ohem_fraction: online hard example mining fraction.
        augment: augmentation spec.
        data: the data's identity (:func:`data_fingerprint`).
        init_checkpoint: SHA-256 of the checkpoint the weights start from (``train.init_from``),
            or None (left out of the payload: hashes of runs from scratch stay as they were).

    Returns:
        A SHA-256 hex digest.
    """
    payload = {
        "options": {k: v for k, v in published_options(options).items() if k not in RESUME_EXEMPT},
        "model": model_spec.to_dict(),
        "fold": fold,
        "loss": dict(loss_weights),
        "ohem_fraction": ohem_fraction,
        "augment": augment,
        "data": data,
    }
    if init_checkpoint is not None:
        payload["init_checkpoint"] = init_checkpoint
    return options_hash(payload)


def data_fingerprint(
    arrays: SegmentationArrays, train_rows: np.ndarray, val_rows: np.ndarray
) -> dict[str, str]:
    """Digests of the training and validation rows and of the arrays' stats.json.

    Args:
        arrays: the preprocess outputs.
        train_rows: array rows trained on.
        val_rows: array rows validated on.

    Returns:
        {"train_rows", "val_rows", "stats"} -> SHA-256 hex digest.
    """

    def digest(rows: np.ndarray) -> str:
        return hashlib.sha256(np.asarray(rows, dtype=np.int64).tobytes()).hexdigest()

    stats = json.dumps(arrays.stats, sort_keys=True)
    return {
        "train_rows": digest(train_rows),
        "val_rows": digest(val_rows),
        "stats": hashlib.sha256(stats.encode()).hexdigest(),
    }


def load_resume(path: Path, expected_hash: str) -> dict[str, Any] | None:
    """The resume state in ``path`` if it is readable and of this configuration, else None.

    Args:
        path: the resume file (``resume_dir/last.pt``); it need not exist.
        expected_hash: :func:`config_hash` of the current configuration.

    Returns:
        The state, or None (with a warning when a file was there but is unusable).
    """
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a foreign or damaged file must not block training
        log.warning("%s: unreadable resume file ignored (%s); training from scratch", path, error)
        return None
    if not isinstance(state, dict) or state.get("format") != RESUME_FORMAT:
        log.warning("%s: not a segflow resume file; ignored, training from scratch", path)
        return None
    if state.get("config_hash") != expected_hash:
        log.warning(
            "%s: written for a different configuration (model, loss, data or options other than "
            "%s changed); ignored, training from scratch",
            path,
            ", ".join(RESUME_EXEMPT),
        )
        return None
    return state


def save_resume(resume_dir: Path, state: Mapping[str, Any], dropped: list[Snapshot]) -> None:
    """Write ``resume_dir/last.pt`` atomically, then delete the snapshots it no longer names.

    Call after the epoch's snapshot is saved (:func:`rank_top_k`): in that order a kill at any
    point leaves a last.pt whose snapshots all exist.

    Args:
        resume_dir: the resume folder (exists).
        state: the complete training state.
        dropped: snapshots that fell out of the top k.
    """
    write_torch(resume_dir / RESUME_FILE, state)
    for snapshot in dropped:
        (resume_dir / snapshot.file).unlink(missing_ok=True)


def remove_resume_state(resume_dir: Path) -> None:
    """Delete what training put in ``resume_dir`` (and the folder if that leaves it empty).

    Args:
        resume_dir: the resume folder (need not exist).
    """
    snapshots = [path for pattern in SNAPSHOT_PATTERNS for path in resume_dir.glob(pattern)]
    for path in [resume_dir / RESUME_FILE, *snapshots]:
        path.unlink(missing_ok=True)
    if resume_dir.is_dir():  # temporaries of a writer killed mid-save (kill -9)
        remove_stale_temporaries(resume_dir)
    with contextlib.suppress(OSError):
        resume_dir.rmdir()


def rank_top_k(
    top_k: list[Snapshot], epoch: int, value: float, k: int, maximise: bool
) -> tuple[list[Snapshot], Snapshot | None, list[Snapshot]]:
    """Rank a new epoch into the top k (best first; the earliest among equals).

    Args:
        top_k: the current top k, best first.
        epoch: the new epoch.
        value: its monitor value.
        k: how many snapshots to keep.
        maximise: whether higher monitor values are better.

    Returns:
        (new top k, the new epoch's snapshot if it made it (its file still to be written) else
        None, earlier snapshots that fell out (their files to delete)).
    """
    ranked = sorted(
        [*top_k, Snapshot(epoch, value, f"snapshot_e{epoch:04d}.pt")],
        key=lambda s: (-s.value if maximise else s.value, s.epoch),
    )
    keep, dropped = ranked[:k], ranked[k:]
    new = next((s for s in keep if s.epoch == epoch), None)
    return keep, new, [s for s in dropped if s.epoch != epoch]


def average_snapshots(resume_dir: Path, top_k: list[Snapshot]) -> dict[str, torch.Tensor]:
    """The element-wise average of the top-k snapshots' weights.

    Float entries are averaged in float64 and cast back; integer buffers (BatchNorm batch
    counters) are the best snapshot's.

    Args:
        resume_dir: where the snapshot files are.
        top_k: the snapshots, best first (at least one).

    Returns:
        A state dict on the CPU.

    Raises:
        SegflowError: a snapshot file is missing.
    """
    states = load_snapshots(resume_dir, top_k)
    averaged = {}
    for name, value in states[0].items():
        if value.dtype.is_floating_point:
            averaged[name] = torch.stack([s[name].double() for s in states]).mean(0).to(value.dtype)
        else:
            averaged[name] = value  # integer buffers (BatchNorm batch counters): the best's
    return averaged


def load_snapshots(resume_dir: Path, snapshots: list[Snapshot]) -> list[dict[str, torch.Tensor]]:
    """The weights of ``snapshots``, in their order.

    Args:
        resume_dir: where the snapshot files are.
        snapshots: the snapshots.

    Returns:
        One state dict (on the CPU) per snapshot.

    Raises:
        SegflowError: a snapshot file is missing.
    """
    states = []
    for snapshot in snapshots:
        path = resume_dir / snapshot.file
        if not path.is_file():
            raise SegflowError(f"{path}: snapshot of epoch {snapshot.epoch} is missing")
        states.append(torch.load(path, map_location="cpu", weights_only=True))
    return states


def keep_recent(
    snapshots: list[Snapshot], new: Snapshot, k: int
) -> tuple[list[Snapshot], list[Snapshot]]:
    """Append ``new`` and keep the ``k`` most recent snapshots (a snapshot ensemble's members).

    Args:
        snapshots: the kept snapshots, oldest first.
        new: the epoch's snapshot (its file already written).
        k: how many to keep.

    Returns:
        (kept snapshots oldest first, the ones that fell out (their files to delete)).
    """
    ranked = [*(s for s in snapshots if s.epoch != new.epoch), new]
    return ranked[-k:], [s for s in ranked[:-k] if s.file != new.file]
