"""Training augmentation: albumentations pipelines from a preset, a list, or a serialized dict.

The config key ``augment`` is one of

- a preset name (:data:`PRESETS`): ``none``, ``d4`` (the 8 flips/rotations of the square) or
  ``heavy`` (D4, affine, elastic or grid distortion, brightness/contrast, hue/saturation for
  3-channel images, Gaussian noise);
- a list of ``{"name": "<albumentations class>", "params": {...}}`` entries, applied in order;
- a dict written by ``albumentations.to_dict`` (any pipeline, OneOf etc. included);
- a list of *phases*, ``[{until_epoch: 2, augment: none}, {until_epoch: 6, augment: d4},
  {augment: heavy}]``: each phase's ``augment`` (any of the above) applies up to and including
  epoch ``until_epoch``, strictly increasing; the last phase has no ``until_epoch`` and runs to
  the end (:func:`augment_phases`, :class:`AugmentSchedule`). The phase of an epoch is a function
  of the epoch alone, so a resumed run picks up the right one.

The pipeline is called as ``aug(image=image, mask=mask)`` so geometric transforms move image and
mask together (masks are resampled nearest-neighbour, so they stay binary) and intensity
transforms touch the image only. Images are (H, W, C) uint8 arrays, C = 1 included: albumentations
2 keeps the trailing channel axis.
"""

from __future__ import annotations

import difflib
import inspect
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import cv2

# albumentations asks PyPI for a newer version on import unless told not to; nothing in segflow
# may reach the network at run time.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A

from segflow.core.errors import SegflowError

PRESETS = ("none", "d4", "heavy")
PHASE_KEYS = ("until_epoch", "augment")

AugmentSpec = str | Sequence[Mapping[str, Any]] | Mapping[str, Any] | None


def build_augmentation(
    spec: AugmentSpec,
    height: int,
    width: int,
    crop: tuple[int, int] | None = None,
    channels: int = 3,
    key: str = "augment",
) -> A.Compose | None:
    """The training augmentation pipeline for ``spec`` (config key ``augment``).

    Args:
        spec: a preset name, a list of ``{"name", "params"}`` entries, or an
            ``albumentations.to_dict`` dict; None means ``"none"``. A list of phases is built
            by :func:`build_augmentation_schedule`.
        height, width: the size of the images the pipeline receives.
        crop: (height, width) of a random patch cut first (patch training); None keeps the size.
        channels: image channels. Colour transforms (hue/saturation) are left out of the presets
            unless it is 3: on 1-channel images albumentations 2 warns on every call and changes
            brightness only, which RandomBrightnessContrast already does.
        key: the config key named in error messages (a phase's is ``augment[i].augment``).

    Returns:
        An ``albumentations.Compose`` to call as ``aug(image=..., mask=...)``, or None when there
        is nothing to do (``"none"`` without a crop).

    Shape:
        image: (H, W, C) uint8; mask: (H, W). Output: the crop size if given, else unchanged —
        ``d4`` on non-square inputs uses only the flips that keep the shape.

    Raises:
        KeyError: unknown preset name (the message lists the presets).
        SegflowError: bad crop, list entry or serialized dict, naming the entry.
    """
    for name, value in (("height", height), ("width", width), ("channels", channels)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SegflowError(f"{key}: {name} must be an integer >= 1, got {value!r}")
    out_height, out_width = height, width
    prefix: list[A.BasicTransform] = []
    if crop is not None:
        out_height, out_width = _check_crop(crop, height, width)
        prefix.append(A.RandomCrop(height=out_height, width=out_width, p=1.0))

    if is_phase_list(spec):
        raise SegflowError(
            f"{key}: a list of phases needs build_augmentation_schedule (phases cannot nest)"
        )
    if spec is None or isinstance(spec, str):
        transforms = _preset(spec or "none", out_height == out_width, channels, key)
    elif isinstance(spec, Mapping):
        transforms = [_from_serialized(spec, key)]
    elif isinstance(spec, Sequence):
        transforms = [_from_entry(f"{key}[{index}]", entry) for index, entry in enumerate(spec)]
    else:
        raise SegflowError(
            f"{key}: expected a preset name, a list of transforms, a list of phases or a "
            f"serialized dict, got {type(spec).__name__}"
        )
    if not prefix and not transforms:
        return None
    return A.Compose([*prefix, *transforms])


@dataclass(frozen=True)
class AugmentPhase:
    """One phase of an augmentation schedule.

    Attributes:
        until_epoch: the phase's last epoch (inclusive); None for the open-ended last phase.
        spec: the phase's augmentation (a preset, transform list or serialized dict).
    """

    until_epoch: int | None
    spec: AugmentSpec


def is_phase_list(spec: Any) -> bool:
    """Whether ``spec`` is a list of phases: a list with a mapping holding ``augment`` or
    ``until_epoch`` (a transform list holds ``{name, params}`` mappings)."""
    if isinstance(spec, str | Mapping) or not isinstance(spec, Sequence):
        return False
    return any(isinstance(entry, Mapping) and set(PHASE_KEYS) & set(entry) for entry in spec)


def augment_phases(spec: AugmentSpec) -> tuple[AugmentPhase, ...]:
    """The phases of an ``augment`` value: its own list, or one open-ended phase.

    Only the structure is checked here; each phase's spec is checked when it is built.

    Args:
        spec: the config value ``augment``.

    Returns:
        The phases in order; the last one has ``until_epoch`` None.

    Raises:
        SegflowError: a malformed phase, naming it as ``augment[i]``.
    """
    if not is_phase_list(spec):
        return (AugmentPhase(None, spec),)
    phases: list[AugmentPhase] = []
    entries = list(spec)  # type: ignore[arg-type]
    for index, entry in enumerate(entries):
        where = f"augment[{index}]"
        last = index == len(entries) - 1
        if not isinstance(entry, Mapping) or "augment" not in entry:
            raise SegflowError(
                f"{where}: expected a phase {{until_epoch: <last epoch>, augment: <preset, "
                f"transform list or dict>}} (a phase list holds phases only)"
            )
        unknown = sorted(set(entry) - set(PHASE_KEYS))
        if unknown:
            raise SegflowError(
                f"{where}: unknown key(s) {unknown}; a phase has {' and '.join(PHASE_KEYS)}"
            )
        if is_phase_list(entry["augment"]):
            raise SegflowError(f"{where}.augment: phases cannot nest")
        until = entry.get("until_epoch")
        if last:
            if until is not None:
                raise SegflowError(
                    f"{where}.until_epoch: the last phase runs to the end of training; "
                    "remove its until_epoch"
                )
        elif isinstance(until, bool) or not isinstance(until, int) or until < 1:
            raise SegflowError(
                f"{where}.until_epoch must be an integer >= 1 (the phase's last epoch), "
                f"got {until!r}; only the last phase has none"
            )
        elif phases and until <= phases[-1].until_epoch:  # type: ignore[operator]
            raise SegflowError(
                f"{where}.until_epoch {until} must be greater than the previous phase's "
                f"{phases[-1].until_epoch}"
            )
        phases.append(AugmentPhase(until, entry["augment"]))
    return tuple(phases)


def phase_index(phases: Sequence[AugmentPhase], epoch: int) -> int:
    """The index of the phase that ``epoch`` (1-based) trains in.

    Args:
        phases: :func:`augment_phases` output.
        epoch: the epoch.

    Returns:
        The first phase whose ``until_epoch`` is at least ``epoch``, else the last phase.
    """
    for index, phase in enumerate(phases):
        if phase.until_epoch is None or epoch <= phase.until_epoch:
            return index
    return len(phases) - 1


@dataclass(frozen=True)
class AugmentSchedule:
    """The built pipeline of every phase; :meth:`index_for` picks an epoch's.

    Attributes:
        phases: the phases (:func:`augment_phases`).
        transforms: each phase's pipeline (:func:`build_augmentation`; None = unchanged).
    """

    phases: tuple[AugmentPhase, ...]
    transforms: tuple[A.Compose | None, ...]

    def index_for(self, epoch: int) -> int:
        """The phase of ``epoch`` (1-based)."""
        return phase_index(self.phases, epoch)

    def transform_for(self, epoch: int) -> A.Compose | None:
        """The pipeline of ``epoch`` (1-based)."""
        return self.transforms[self.index_for(epoch)]


def build_augmentation_schedule(
    spec: AugmentSpec,
    height: int,
    width: int,
    crop: tuple[int, int] | None = None,
    channels: int = 3,
) -> AugmentSchedule:
    """Every phase's pipeline of an ``augment`` value (a plain spec is one open-ended phase).

    Args:
        spec: the config value ``augment``: a spec of :func:`build_augmentation`, or a list of
            phases ``{until_epoch, augment}``.
        height, width, crop, channels: as in :func:`build_augmentation` (the crop applies in
            every phase).

    Returns:
        The schedule; every phase is built (and so validated) up front.

    Raises:
        KeyError: an unknown preset name (the message lists the presets).
        SegflowError: a malformed phase or spec, naming it (``augment[i].augment[j]`` etc.).
    """
    phases = augment_phases(spec)
    several = len(phases) > 1
    transforms = tuple(
        build_augmentation(
            phase.spec,
            height,
            width,
            crop=crop,
            channels=channels,
            key=f"augment[{index}].augment" if several else "augment",
        )
        for index, phase in enumerate(phases)
    )
    return AugmentSchedule(phases, transforms)


def _check_crop(crop: Any, height: int, width: int) -> tuple[int, int]:
    if (
        not isinstance(crop, Sequence)
        or len(crop) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in crop)
    ):
        raise SegflowError(f"augment.crop must be [height, width] of positive integers, got {crop}")
    crop_height, crop_width = crop
    if crop_height > height or crop_width > width:
        raise SegflowError(
            f"augment.crop {crop_height}x{crop_width} is larger than the images ({height}x{width})"
        )
    return crop_height, crop_width


def _preset(name: str, square: bool, channels: int, key: str = "augment") -> list[Any]:
    if name not in PRESETS:
        raise KeyError(f"{key}: unknown preset {name!r}; valid: {', '.join(PRESETS)}")
    if name == "none":
        return []
    # D4 includes the transpose, which swaps height and width: only the flips keep a
    # non-square shape (and then rotations by 180 degrees are their composition).
    dihedral: list[Any] = (
        [A.D4(p=1.0)] if square else [A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5)]
    )
    if name == "d4":
        return dihedral
    # Reflecting borders keeps image statistics (no black corners); the mask is reflected
    # with the same geometry, so labels stay aligned.
    reflect = cv2.BORDER_REFLECT_101
    heavy = [
        *dihedral,
        A.Affine(
            scale=(0.9, 1.1),
            translate_percent=(-0.0625, 0.0625),
            rotate=(-15, 15),
            border_mode=reflect,
            p=0.5,
        ),
        A.OneOf(
            [
                # alpha 120 / sigma 6: about 1 pixel of mean displacement, whatever the size.
                A.ElasticTransform(alpha=120, sigma=6, border_mode=reflect),
                A.GridDistortion(distort_limit=0.2, border_mode=reflect),
            ],
            p=0.25,
        ),
        A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.2, p=0.5),
    ]
    if channels == 3:
        heavy.append(
            A.HueSaturationValue(hue_shift_limit=10, sat_shift_limit=15, val_shift_limit=10, p=0.3)
        )
    # std_range is a fraction of the dtype's maximum (255 for uint8): 2-6 %.
    heavy.append(A.GaussNoise(std_range=(0.02, 0.06), p=0.2))
    return heavy


def _from_entry(where: str, entry: Any) -> A.BasicTransform:
    """One ``{"name": ..., "params": {...}}`` list entry (config key ``where``) as a transform."""
    if not isinstance(entry, Mapping) or not isinstance(entry.get("name"), str):
        raise SegflowError(f"{where}: expected {{'name': <transform>, 'params': {{...}}}}")
    unknown_keys = sorted(set(entry) - {"name", "params"})
    if unknown_keys:
        raise SegflowError(f"{where}: unknown key(s) {unknown_keys}; only 'name' and 'params'")
    name = entry["name"]
    params = entry.get("params") or {}
    if not isinstance(params, Mapping):
        raise SegflowError(f"{where}: params must be a mapping, got {type(params).__name__}")
    cls = getattr(A, name, None)
    if not (isinstance(cls, type) and issubclass(cls, A.BasicTransform)):
        close = difflib.get_close_matches(name, _transform_names(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise SegflowError(f"{where}: unknown albumentations transform {name!r}{hint}")
    signature = inspect.signature(cls)
    # albumentations only warns about unknown arguments; in a config they are typos.
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values()):
        bad = sorted(set(params) - set(signature.parameters))
        if bad:
            raise SegflowError(
                f"{where}: {name} has no parameter(s) {bad}; "
                f"valid: {', '.join(signature.parameters)}"
            )
    try:
        return cls(**params)
    except (TypeError, ValueError) as exc:  # pydantic's ValidationError is a ValueError
        raise SegflowError(f"{where}: invalid params for {name}: {_one_line(exc)}") from exc


def _from_serialized(spec: Mapping[str, Any], key: str = "augment") -> Any:
    if "transform" not in spec:
        raise SegflowError(
            f"{key}: a mapping must be an albumentations.to_dict() result (with a 'transform' key)"
        )
    try:
        return A.from_dict(dict(spec))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise SegflowError(
            f"{key}: invalid serialized albumentations pipeline ({type(exc).__name__}: {exc})"
        ) from exc


def _transform_names() -> list[str]:
    return [
        name
        for name in dir(A)
        if isinstance(getattr(A, name), type) and issubclass(getattr(A, name), A.BasicTransform)
    ]


def _one_line(exc: BaseException) -> str:
    """pydantic's multi-line validation message on one line, without its help links."""
    lines = [line.strip() for line in str(exc).splitlines()]
    return " ".join(line for line in lines if line and not line.startswith("For further"))
