"""The export bundle: one self-contained zip that predicts a submission without the results
folder (``segflow export`` writes it, ``segflow predict-bundle`` runs it).

Members:

- ``manifest.json``: ``format`` (:data:`BUNDLE_FORMAT`), ``bundle_version``
  (:data:`BUNDLE_VERSION`), ``segflow_version``, ``weights_format`` (``safetensors`` or
  ``torch``), ``fp16`` and ``members``: the sha256 of every other member. A reader refuses a
  member whose checksum differs, a member missing or not listed, and a bundle of a newer
  bundle format or segflow version than its own.
- ``bundle.json``: what to run (:func:`segflow.bundle.export.bundle_config`): the
  candidate, preprocessing, TTA and fold merge, the experiments (model specs, normalisation,
  blend weights), the tuned post-processing, classes and submission format.
- ``models/<experiment>/<member>.safetensors`` (or ``.pt``): one model's weights, a flat
  mapping of tensor name -> tensor (a snapshot ensemble's members prefixed ``<i>/``).
- ``stack/class_<k>/<prefix>_model.txt`` (or ``.cbm``): a stacked candidate's fitted
  second-level models (gate, threshold regressor, pixel blender) in LightGBM's text or
  CatBoost's binary format, as ``segflow stack`` saved them.
- ``leaks.json``: the labels of the train images (per exact-duplicate group, by pixel hash) for
  the leak copy of test images identical to a train image.

Nothing is unpickled: JSON members are parsed as JSON, weights are read by ``safetensors`` or
by ``torch.load(weights_only=True)``, second-level models by LightGBM and CatBoost from their
own formats.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from segflow import __version__
from segflow.core.atomic import atomic_path
from segflow.core.errors import SegflowError

if TYPE_CHECKING:
    import torch

BUNDLE_FORMAT = "segflow-bundle"
# 2: stacked candidates (the ``stack`` section of bundle.json and its ``stack/`` members).
BUNDLE_VERSION = 2
MANIFEST = "manifest.json"
CONFIG = "bundle.json"
LEAKS = "leaks.json"
STACK_MEMBERS = "stack"
WEIGHT_SUFFIXES = {"safetensors": ".safetensors", "torch": ".pt"}
_SNAPSHOT_KEY = re.compile(r"^(\d+)/(.+)$")


def version_tuple(version: str) -> tuple[int, ...]:
    """The leading numeric release parts of a version string (``"0.1.0rc1"`` -> (0, 1, 0))."""
    parts = []
    for part in str(version).split("."):
        digits = re.match(r"\d+", part)
        if digits is None:
            break
        parts.append(int(digits.group()))
        if digits.group() != part:
            break
    return tuple(parts)


def weights_format() -> str:
    """``safetensors`` when the package is installed, else ``torch`` (a weights-only torch.save)."""
    try:
        import safetensors.torch  # noqa: F401
    except ImportError:
        return "torch"
    return "safetensors"


def encode_weights(tensors: Mapping[str, torch.Tensor], fmt: str) -> bytes:
    """Serialise a flat name -> tensor mapping in ``fmt`` (:data:`WEIGHT_SUFFIXES`)."""
    import torch

    plain = {name: tensor.detach().cpu().contiguous().clone() for name, tensor in tensors.items()}
    if fmt == "safetensors":
        from safetensors.torch import save

        return save(plain)
    buffer = io.BytesIO()
    torch.save(plain, buffer)
    return buffer.getvalue()


def flat_states(states: list[Mapping[str, torch.Tensor]], fp16: bool) -> dict[str, torch.Tensor]:
    """One model's state dicts as one flat mapping: a single model's names as they are, a
    snapshot ensemble's prefixed ``<i>/``; floating tensors halved with ``fp16``."""
    import torch

    flat: dict[str, torch.Tensor] = {}
    for index, state in enumerate(states):
        for name, tensor in state.items():
            if fp16 and torch.is_floating_point(tensor):
                tensor = tensor.half()
            flat[name if len(states) == 1 else f"{index}/{name}"] = tensor
    return flat


def split_states(flat: Mapping[str, torch.Tensor], snapshots: int) -> list[dict[str, torch.Tensor]]:
    """Inverse of :func:`flat_states`: ``snapshots`` state dicts (0: one plain model)."""
    if not snapshots:
        return [dict(flat)]
    states: list[dict[str, torch.Tensor]] = [{} for _ in range(snapshots)]
    for name, tensor in flat.items():
        match = _SNAPSHOT_KEY.match(name)
        if match is None or int(match.group(1)) >= snapshots:
            raise SegflowError(f"bundle weights: tensor {name!r} belongs to no snapshot")
        states[int(match.group(1))][match.group(2)] = tensor
    return states


def write_bundle(
    path: str | os.PathLike[str], members: Mapping[str, bytes], header: Mapping[str, Any]
) -> int:
    """Write the zip atomically: ``members`` plus ``manifest.json`` (``header`` and checksums).

    Returns:
        The zip's size in bytes.
    """
    manifest = {
        "format": BUNDLE_FORMAT,
        "bundle_version": BUNDLE_VERSION,
        "segflow_version": __version__,
        **header,
        "members": {name: hashlib.sha256(data).hexdigest() for name, data in members.items()},
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    contents = {MANIFEST: json.dumps(manifest, indent=1, sort_keys=True).encode(), **members}
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as archive:
        for name in [MANIFEST, *sorted(members)]:
            # A fixed timestamp: the same models and settings give the same bytes.
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, contents[name])
    return path.stat().st_size


class Bundle:
    """A verified bundle, read into memory (weights are decoded on request).

    Raises (on open):
        SegflowError: not a zip or not a bundle, a newer bundle format or segflow version, a
            member missing, unlisted or with a checksum that differs.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise SegflowError(f"bundle {self.path} does not exist")
        try:
            with zipfile.ZipFile(self.path) as archive:
                self._members = {name: archive.read(name) for name in archive.namelist()}
        except (zipfile.BadZipFile, OSError) as error:
            raise SegflowError(f"bundle {self.path} is not a readable zip ({error})") from None
        self.manifest = self._json(MANIFEST)
        self._check_versions()
        listed = self.manifest.get("members")
        if not isinstance(listed, dict):
            raise SegflowError(f"bundle {self.path}: {MANIFEST} lists no members")
        for name, digest in listed.items():
            if name not in self._members:
                raise SegflowError(f"bundle {self.path}: member {name} is missing")
            if hashlib.sha256(self._members[name]).hexdigest() != digest:
                raise SegflowError(
                    f"bundle {self.path}: member {name} does not match its sha256 in {MANIFEST} "
                    "(corrupted or edited)"
                )
        unlisted = sorted(set(self._members) - set(listed) - {MANIFEST})
        if unlisted:
            raise SegflowError(f"bundle {self.path}: member {unlisted[0]} is not in {MANIFEST}")
        self.config = self._json(CONFIG)

    def _check_versions(self) -> None:
        manifest = self.manifest
        if manifest.get("format") != BUNDLE_FORMAT:
            raise SegflowError(f"{self.path} is not a segflow bundle ({MANIFEST} format)")
        version = manifest.get("bundle_version")
        if not isinstance(version, int) or version > BUNDLE_VERSION:
            raise SegflowError(
                f"bundle {self.path} has bundle format {version!r}, this segflow "
                f"{__version__} reads up to {BUNDLE_VERSION}; upgrade segflow"
            )
        made_by = str(manifest.get("segflow_version", ""))
        if version_tuple(made_by) > version_tuple(__version__):
            raise SegflowError(
                f"bundle {self.path} was made by segflow {made_by}, newer than this "
                f"{__version__}; upgrade segflow"
            )

    def _json(self, name: str) -> dict[str, Any]:
        if name not in self._members:
            raise SegflowError(f"bundle {self.path}: member {name} is missing")
        try:
            value = json.loads(self._members[name].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise SegflowError(f"bundle {self.path}: {name} is not valid JSON ({error})") from None
        if not isinstance(value, dict):
            raise SegflowError(f"bundle {self.path}: {name} is not a JSON object")
        return value

    def json(self, name: str) -> dict[str, Any]:
        """A JSON member (checked against the manifest on open)."""
        return self._json(name)

    def extract(self, prefix: str, folder: str | os.PathLike[str]) -> Path:
        """Write the members under ``prefix/`` into ``folder`` (their paths below ``prefix``
        kept), for readers that load files (the second-level models); returns the folder."""
        folder = Path(folder)
        for name, data in self._members.items():
            if name.startswith(f"{prefix}/"):
                relative = Path(name[len(prefix) + 1 :])
                if relative.is_absolute() or ".." in relative.parts:
                    raise SegflowError(f"bundle {self.path}: member {name} leaves its folder")
                target = folder / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
        return folder

    def weights(self, name: str) -> dict[str, torch.Tensor]:
        """A weights member as name -> tensor, without unpickling anything."""
        if name not in self._members:
            raise SegflowError(f"bundle {self.path}: member {name} is missing")
        data = self._members[name]
        fmt = self.manifest.get("weights_format")
        if fmt == "safetensors":
            try:
                from safetensors.torch import load
            except ImportError:
                raise SegflowError(
                    f"bundle {self.path} stores safetensors weights; pip install safetensors"
                ) from None
            return dict(load(data))
        if fmt == "torch":
            import torch

            try:
                tensors = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
            except Exception as error:
                raise SegflowError(
                    f"bundle {self.path}: {name} is not readable ({error})"
                ) from None
            if not isinstance(tensors, dict):
                raise SegflowError(f"bundle {self.path}: {name} is not a mapping of tensors")
            return tensors
        raise SegflowError(f"bundle {self.path}: unknown weights_format {fmt!r}")
