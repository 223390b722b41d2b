"""FISP magnetic resonance fingerprinting (Jiang et al., MRM 74:1621-1631, 2015), EPG-simulated.

Sequence: optional ideal (adiabatic) inversion followed by a delay ``InversionTime``; then, for each
time point ``i``: RF pulse of ``FlipAngle[i]`` (scaled by B1) about the axis at ``RFPhase[i]``,
relaxation to the echo time, readout of ``F+_0`` at ``EchoTime[i]``, relaxation to the end of
``RepetitionTimeExcitation[i]`` and one unbalanced gradient unit (the FISP dephasing moment, which
makes the signal insensitive to off-resonance within a voxel).

Signal convention: ``S_i = M0 * (i * F+_0)`` with complex ``M0 = M0_re + i M0_im``; the factor
``i`` makes a 90 deg pulse about x on equilibrium give ``+M0`` (so the M0 phase is the receiver
phase). ``is_complex = True``.

Parameters: ``(M0_re, M0_im, T1 [s], T2 [s], B1)`` (``B1`` only with ``estimate_b1=True``; it
multiplies the known ``b1`` argument if both are given).

**Truncation.** The exact simulation needs ``n_time // 2 + 1`` EPG orders (251 for the default
500-point schedule). The default keeps :data:`DEFAULT_MRF_STATES` = 48 orders: a dropped order
``k`` would need ``k`` more TRs of T2 decay and small-flip mixing (``sin^2(alpha/2)``) to come
back. Measured on the default schedule, the maximum error relative to the peak signal is
< 2e-4 for T2 <= 300 ms, < 3e-3 at T2 = 1 s and < 1e-2 at T2 = 1.6 s (T1 3.2 s);
``n_states="exact"`` removes it
(the test suite checks these bounds).

The schedule (:class:`MRFSchedule`) is read from a BIDS sidecar or a ``_mrfschedule.tsv`` beside the
data (see ``qmri_bids/qmri/MRF_CONVENTION.md`` and :func:`read_mrf_schedule`); the packaged default
``qmri_bids/data/mrf_default_schedule.tsv`` is produced by :func:`default_mrf_schedule`.
"""

from __future__ import annotations

import csv
import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from qmri_bids.errors import BadDataError
from qmri_bids.qmri import epg
from qmri_bids.qmri.base import CollectionSpec, ParameterSpec, SignalModel, floats
from qmri_bids.qmri.models.mese import T2_OUTPUT
from qmri_bids.qmri.models.vfa import M0_OUTPUT, T1_OUTPUT
from qmri_bids.qmri.prior import ParameterPrior, PriorRange

if TYPE_CHECKING:
    from qmri_bids.qmri.dictionary import DictionaryGrid
    from qmri_bids.qmri.sidecar import Member

log = logging.getLogger("qmri_bids.qmri")

__all__ = [
    "DEFAULT_MRF_STATES",
    "MRFModel",
    "MRFSchedule",
    "default_mrf_schedule",
    "default_schedule_path",
    "load_mrf_series",
    "read_mrf_schedule",
    "schedule_tsv_path",
    "write_default_schedule",
    "write_mrf_series",
]

#: range of the known relative B1+ the MRF network is trained over (an input of the network)
MRF_B1_RANGE = (0.6, 1.4)

#: default number of EPG orders kept by :class:`MRFModel` (see module docstring)
DEFAULT_MRF_STATES = 48

#: columns of a ``_mrfschedule.tsv`` (one row per time point); named after the BIDS sidecar keys
TSV_COLUMNS = ("FlipAngle", "RepetitionTimeExcitation", "EchoTime", "RFPhase")


@dataclass(frozen=True)
class MRFSchedule:
    """An MRF acquisition schedule (one entry per time point, SI units except angles in degrees).

    Attributes:
        flip_angle_deg: nominal flip angles (deg).
        tr: repetition times (s).
        te: echo times (s), each < the corresponding TR.
        rf_phase_deg: RF phases (deg), 0 = about x.
        inversion_time: delay (s) between an ideal inversion and the first pulse; None = no
            inversion preparation.
    """

    flip_angle_deg: np.ndarray
    tr: np.ndarray
    te: np.ndarray
    rf_phase_deg: np.ndarray = field(default=None)  # type: ignore[assignment]
    inversion_time: float | None = None

    def __post_init__(self) -> None:
        fa = np.asarray(self.flip_angle_deg, dtype=np.float64).reshape(-1)
        n = fa.size
        tr = np.broadcast_to(np.asarray(self.tr, dtype=np.float64), (n,)).copy()
        te = np.broadcast_to(np.asarray(self.te, dtype=np.float64), (n,)).copy()
        ph = self.rf_phase_deg
        ph = np.zeros(n) if ph is None else np.broadcast_to(np.asarray(ph, dtype=np.float64), (n,))
        if n == 0:
            raise ValueError("empty MRF schedule")
        if np.any(tr <= 0) or np.any(te < 0) or np.any(te > tr):
            raise ValueError("MRF schedule needs TR > 0 and 0 <= TE <= TR")
        if self.inversion_time is not None and self.inversion_time < 0:
            raise ValueError("InversionTime must be >= 0")
        object.__setattr__(self, "flip_angle_deg", fa)
        object.__setattr__(self, "tr", tr)
        object.__setattr__(self, "te", te)
        object.__setattr__(self, "rf_phase_deg", np.asarray(ph, dtype=np.float64).copy())
        if self.inversion_time is not None:
            object.__setattr__(self, "inversion_time", float(self.inversion_time))

    @property
    def n_timepoints(self) -> int:
        return int(self.flip_angle_deg.size)

    def to_tsv(self, path: str | Path) -> Path:
        """Write the per-time-point columns (``TSV_COLUMNS``); the inversion goes in the sidecar."""
        path = Path(path)
        with path.open("w", newline="") as fh:
            w = csv.writer(fh, delimiter="\t", lineterminator="\n")
            w.writerow(TSV_COLUMNS)
            for row in zip(self.flip_angle_deg, self.tr, self.te, self.rf_phase_deg, strict=True):
                w.writerow([f"{v:.10g}" for v in row])
        return path

    @classmethod
    def from_tsv(
        cls,
        path: str | Path,
        inversion_time: float | None = None,
        echo_time: float | Sequence[float] | None = None,
    ) -> MRFSchedule:
        """Read a ``_mrfschedule.tsv``: ``FlipAngle`` and ``RepetitionTimeExcitation`` columns are
        required; ``EchoTime`` (else ``echo_time``) and ``RFPhase`` (else 0) are optional."""
        with Path(path).open(newline="") as fh:
            rows = list(csv.DictReader(fh, delimiter="\t"))
        if not rows:
            raise ValueError(f"{path}: no rows")
        cols = {k: np.array([float(r[k]) for r in rows]) for k in rows[0]}
        for req in ("FlipAngle", "RepetitionTimeExcitation"):
            if req not in cols:
                raise ValueError(f"{path}: missing column {req!r}")
        te = cols.get("EchoTime", echo_time)
        if te is None:
            raise ValueError(f"{path}: no EchoTime column and no echo_time given")
        return cls(cols["FlipAngle"], cols["RepetitionTimeExcitation"], te, cols.get("RFPhase"),
                   inversion_time)

    def to_sidecar(self) -> dict[str, Any]:
        """The schedule as BIDS sidecar fields (arrays where they vary)."""

        def compact(a: np.ndarray) -> float | list[float]:
            return float(a[0]) if np.all(a == a[0]) else [float(v) for v in a]

        meta: dict[str, Any] = {
            "FlipAngle": [float(v) for v in self.flip_angle_deg],
            "RepetitionTimeExcitation": compact(self.tr),
            "EchoTime": compact(self.te),
        }
        if np.any(self.rf_phase_deg != 0):
            meta["RFPhase"] = [float(v) for v in self.rf_phase_deg]
        if self.inversion_time is not None:
            meta["InversionTime"] = self.inversion_time
        return meta

    @classmethod
    def from_sidecar(cls, meta: Mapping[str, Any]) -> MRFSchedule:
        fa = np.atleast_1d(np.asarray(meta["FlipAngle"], dtype=np.float64))
        tr = meta.get("RepetitionTimeExcitation", meta.get("RepetitionTime"))
        if tr is None:
            raise ValueError("sidecar has no RepetitionTimeExcitation")
        return cls(fa, tr, meta["EchoTime"], meta.get("RFPhase"), meta.get("InversionTime"))


def _perlin_1d(n: int, period: int, rng: np.random.RandomState) -> np.ndarray:
    """1-D gradient (Perlin) noise: random slopes at lattice points every ``period`` samples,
    blended with the quintic fade 6t^5-15t^4+10t^3 (smooth, no plateaus)."""
    n_lattice = n // period + 2
    grads = rng.uniform(-1.0, 1.0, n_lattice)
    x = np.arange(n) / period
    i0 = np.floor(x).astype(int)
    t = x - i0
    fade = t * t * t * (t * (t * 6 - 15) + 10)
    a = grads[i0] * t
    b = grads[i0 + 1] * (t - 1)
    return a + fade * (b - a)


def default_mrf_schedule(
    n_timepoints: int = 500,
    n_lobes: int = 5,
    max_flip_deg: Sequence[float] = (60.0, 35.0, 50.0, 25.0, 45.0),
    min_flip_deg: float = 5.0,
    tr_range_s: tuple[float, float] = (11e-3, 15e-3),
    te_s: float = 2e-3,
    inversion_time_s: float | None = 0.02,
    seed: int = 20150,
) -> MRFSchedule:
    """Deterministic Jiang-like FISP-MRF schedule (the packaged default).

    * flip angles: ``n_lobes`` half-sine lobes of equal length, lobe ``j`` rising from
      ``min_flip_deg`` to ``max_flip_deg[j % len]`` and back (5-60 deg by default);
    * TR: 1-D Perlin noise (lattice every 50 time points, ``numpy.random.RandomState(seed)``, which
      is bit-stable across numpy versions) min-max scaled to ``tr_range_s`` (11-15 ms);
    * TE: constant ``te_s`` (2 ms); an ideal inversion ``inversion_time_s`` (20 ms) before the
      first pulse.

    500 time points keep a ~10^4-atom dictionary at a few seconds on 2 CPU cores.
    """
    if n_timepoints < n_lobes:
        raise ValueError("need at least one time point per lobe")
    edges = np.linspace(0, n_timepoints, n_lobes + 1).round().astype(int)
    fa = np.empty(n_timepoints)
    for j in range(n_lobes):
        m = edges[j + 1] - edges[j]
        peak = max_flip_deg[j % len(max_flip_deg)]
        fa[edges[j]: edges[j + 1]] = min_flip_deg + (peak - min_flip_deg) * np.sin(
            np.pi * (np.arange(m) + 0.5) / m
        )
    noise = _perlin_1d(n_timepoints, 50, np.random.RandomState(seed))
    noise = (noise - noise.min()) / max(noise.max() - noise.min(), 1e-12)
    tr = tr_range_s[0] + (tr_range_s[1] - tr_range_s[0]) * noise
    # round to 1 us / 0.01 deg so the TSV round-trips exactly
    return MRFSchedule(np.round(fa, 2), np.round(tr, 6), te_s, None, inversion_time_s)


def default_schedule_path() -> Path:
    """Path of the packaged ``mrf_default_schedule.tsv``."""
    return Path(str(resources.files("qmri_bids") / "data" / "mrf_default_schedule.tsv"))


def write_default_schedule(path: str | Path | None = None) -> Path:
    """(Re)generate the packaged default schedule TSV and its JSON sidecar (``InversionTime``)."""
    path = Path(path) if path is not None else default_schedule_path()
    sched = default_mrf_schedule()
    sched.to_tsv(path)
    side = {
        "InversionTime": sched.inversion_time,
        "Description": "qmri_bids.qmri.models.mrf.default_mrf_schedule() (Jiang-like FISP-MRF)",
        "FlipAngle": {"Units": "deg"},
        "RepetitionTimeExcitation": {"Units": "s"},
        "EchoTime": {"Units": "s"},
        "RFPhase": {"Units": "deg"},
    }
    path.with_suffix(".json").write_text(json.dumps(side, indent=2) + "\n")
    return path


_PART_RE = re.compile(r"_part-(mag|phase|real|imag)")


def schedule_tsv_path(nifti_path: str | Path) -> Path:
    """``sub-X[_ses-Y][_acq-Z][_part-P]_MRF.nii[.gz]`` -> ``sub-X[..]_mrfschedule.tsv``."""
    p = Path(nifti_path)
    name = p.name
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            name = name[: -len(ext)]
            break
    name = _PART_RE.sub("", name)
    name = name.removesuffix("_MRF")
    return p.with_name(f"{name}_mrfschedule.tsv")


def read_mrf_schedule(nifti_path: str | Path, metadata: Mapping[str, Any]) -> MRFSchedule:
    """Schedule of an MRF series (see MRF_CONVENTION.md).

    Precedence: a sidecar ``FlipAngle`` *array* (length > 1) means the whole schedule is in the
    sidecar; otherwise ``<prefix>_mrfschedule.tsv`` beside the NIfTI is read, with ``EchoTime``
    and ``InversionTime`` from the sidecar when the TSV lacks them (sidecar ``InversionTime``
    absent or null = no inversion; the TSV's own ``.json`` may also hold it).
    """
    fa = metadata.get("FlipAngle")
    if fa is not None and np.atleast_1d(np.asarray(fa)).size > 1:
        return MRFSchedule.from_sidecar(metadata)
    tsv = schedule_tsv_path(nifti_path)
    if not tsv.is_file():
        raise FileNotFoundError(
            f"no MRF schedule: sidecar of {nifti_path} has no FlipAngle array and {tsv} is absent"
        )
    ti = metadata.get("InversionTime")
    side = tsv.with_suffix(".json")
    if ti is None and side.is_file():
        ti = json.loads(side.read_text()).get("InversionTime")
    return MRFSchedule.from_tsv(tsv, inversion_time=ti, echo_time=metadata.get("EchoTime"))


def _strip_nii(name: str) -> str:
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


def load_mrf_series(
    nifti_path: str | Path, metadata: Mapping[str, Any] | None = None
) -> tuple[np.ndarray, np.ndarray, MRFSchedule]:
    """Load a complex MRF series stored per MRF_CONVENTION.md.

    ``nifti_path`` is any ``part-`` file of the series (``mag``/``phase`` or ``real``/``imag``);
    its partner is found by replacing the ``part`` entity. ``metadata`` defaults to the JSON
    sidecar beside ``nifti_path``. Returns ``(data[x, y, z, t] complex128, affine, schedule)``.
    """
    import nibabel as nib  # local: keep the physics importable without the IO stack

    p = Path(nifti_path)
    m = _PART_RE.search(p.name)
    if metadata is None:
        side = p.with_name(_strip_nii(p.name) + ".json")
        metadata = json.loads(side.read_text()) if side.is_file() else {}
    schedule = read_mrf_schedule(p, metadata)
    if m is None:
        raise ValueError(f"{p.name}: MRF series need a part- entity (mag/phase or real/imag)")
    pair = {"mag": ("mag", "phase"), "phase": ("mag", "phase"),
            "real": ("real", "imag"), "imag": ("real", "imag")}[m.group(1)]
    paths = [p.with_name(_PART_RE.sub(f"_part-{q}", p.name)) for q in pair]
    img0 = nib.load(str(paths[0]))
    a = np.asarray(img0.dataobj, dtype=np.float64)
    b = np.asarray(nib.load(str(paths[1])).dataobj, dtype=np.float64)
    data = a * np.exp(1j * b) if pair[0] == "mag" else a + 1j * b
    if data.ndim == 3:  # a single slice series stored as (x, y, t)
        data = data[:, :, None, :]
    if data.shape[-1] != schedule.n_timepoints:
        raise ValueError(
            f"{p.name}: {data.shape[-1]} volumes but the schedule has {schedule.n_timepoints}"
        )
    return data, img0.affine, schedule


def write_mrf_series(
    out_dir: str | Path,
    prefix: str,
    data: np.ndarray,
    affine: np.ndarray,
    schedule: MRFSchedule,
    inline_schedule: bool = False,
    extra_metadata: Mapping[str, Any] | None = None,
) -> list[Path]:
    """Write a complex series ``data[x, y, z, t]`` as ``{prefix}_part-{mag,phase}_MRF.nii.gz`` +
    sidecars, and the schedule as ``{prefix}_mrfschedule.tsv`` (+ ``.json`` with
    ``InversionTime``) or, with ``inline_schedule``, as sidecar arrays. ``prefix`` is e.g.
    ``sub-01_acq-fisp``. Returns the written paths."""
    import nibabel as nib

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = np.asarray(data)
    if data.shape[-1] != schedule.n_timepoints:
        raise ValueError("last axis of data must be the schedule's time points")
    base: dict[str, Any] = {"MRFSequence": "FISP", **(extra_metadata or {})}
    if inline_schedule:
        base.update(schedule.to_sidecar())
    else:
        sc = schedule.to_sidecar()
        base["EchoTime"] = sc["EchoTime"] if not isinstance(sc["EchoTime"], list) else None
        base = {k: v for k, v in base.items() if v is not None}
        if schedule.inversion_time is not None:
            base["InversionTime"] = schedule.inversion_time
    written = []
    for part, arr, units in (("mag", np.abs(data), "arbitrary"), ("phase", np.angle(data), "rad")):
        name = f"{prefix}_part-{part}_MRF"
        img = nib.Nifti1Image(arr.astype(np.float32), affine)
        img.header.set_xyzt_units("mm", "sec")
        nib.save(img, str(out / f"{name}.nii.gz"))
        meta = {**base, "Units": units}
        (out / f"{name}.json").write_text(json.dumps(meta, indent=2) + "\n")
        written += [out / f"{name}.nii.gz", out / f"{name}.json"]
    if not inline_schedule:
        tsv = schedule.to_tsv(out / f"{prefix}_mrfschedule.tsv")
        side = {"InversionTime": schedule.inversion_time,
                "FlipAngle": {"Units": "deg"}, "RepetitionTimeExcitation": {"Units": "s"},
                "EchoTime": {"Units": "s"}, "RFPhase": {"Units": "deg"}}
        tsv.with_suffix(".json").write_text(json.dumps(side, indent=2) + "\n")
        written += [tsv, tsv.with_suffix(".json")]
    return written


class MRFModel(SignalModel):
    """FISP-MRF signal model (``name = "mrf"``), complex-valued.

    Args:
        schedule: the acquisition schedule; default :func:`default_mrf_schedule`.
        estimate_b1: whether ``B1`` is a model parameter (else the ``b1`` argument, default 1).
        n_states: EPG orders kept (default :data:`DEFAULT_MRF_STATES`; ``None``-> default,
            ``"exact"`` -> ``n_time // 2 + 1``).
        force_complex: use the complex EPG even when all RF phases are 0 (the real path is
            then used by default; both give the same signal).
    """

    name = "mrf"
    is_complex = True
    # This project's convention (MRF_CONVENTION.md): a part-mag/part-phase (or real/imag) pair
    # per series, the schedule as sidecar arrays or a _mrfschedule.tsv beside the images.
    collection = CollectionSpec("MRF", ("part",),
                                ("FlipAngle", "RepetitionTimeExcitation", "EchoTime"),
                                description="MR fingerprinting (T1, T2, M0)",
                                array_fields=("FlipAngle", "RepetitionTimeExcitation",
                                              "EchoTime"),
                                image_ndim=4)
    outputs = (T1_OUTPUT, T2_OUTPUT, M0_OUTPUT)
    # Dictionary matching is the field's reference method (Ma et al., Nature 2013).
    estimators = ("nn", "nlls", "dict")
    # The members are the two parts of one complex series: nothing to compare between them.
    compare_members = False

    def __init__(
        self,
        schedule: MRFSchedule | None = None,
        estimate_b1: bool = True,
        n_states: int | str | None = None,
        force_complex: bool = False,
    ) -> None:
        self.schedule = schedule if schedule is not None else default_mrf_schedule()
        self.estimate_b1 = bool(estimate_b1)
        if n_states == "exact":
            n_states = epg.exact_n_states(self.schedule.n_timepoints)
        self.n_states = int(n_states) if n_states is not None else DEFAULT_MRF_STATES
        params = [
            ParameterSpec("M0_re", "a.u.", -float("inf"), float("inf"), nuisance=True),
            ParameterSpec("M0_im", "a.u.", -float("inf"), float("inf"), nuisance=True),
            ParameterSpec("T1", "s", 5e-3, 6.0),
            ParameterSpec("T2", "s", 1e-3, 3.0),
        ]
        if self.estimate_b1:
            params.append(ParameterSpec("B1", "", 0.3, 1.7))
        self.parameters = tuple(params)
        s = self.schedule
        # float64 CPU constants, cast to the params' dtype/device at call time
        self._alpha = torch.as_tensor(np.deg2rad(s.flip_angle_deg))
        self._phi = torch.as_tensor(np.deg2rad(s.rf_phase_deg))
        self._te = torch.as_tensor(s.te)
        self._tr_rest = torch.as_tensor(s.tr - s.te)
        # zero RF phases (the FISP default) allow the 4x cheaper real EPG; force_complex for tests
        self._real_path = bool(np.all(s.rf_phase_deg == 0)) and not force_complex

    @property
    def n_timepoints(self) -> int:
        return self.schedule.n_timepoints

    def to_protocol(self) -> dict[str, Any]:
        s = self.schedule
        return {"schedule": {"flip_angle_deg": floats(s.flip_angle_deg), "tr": floats(s.tr),
                             "te": floats(s.te), "rf_phase_deg": floats(s.rf_phase_deg),
                             "inversion_time": s.inversion_time},
                "estimate_b1": bool(self.estimate_b1), "n_states": int(self.n_states)}

    @classmethod
    def from_protocol(cls, protocol: Mapping[str, Any]) -> MRFModel:
        return cls(MRFSchedule(**protocol["schedule"]), estimate_b1=protocol["estimate_b1"],
                   n_states=protocol["n_states"])

    @classmethod
    def from_sidecars(cls, members: Sequence[Member]) -> MRFModel:
        """The schedule of the series (its first part); B1 is not estimated: a TB1map, when
        given, is a known input."""
        first = members[0]
        try:
            schedule = read_mrf_schedule(first.path, first.metadata)
        except (ValueError, KeyError, TypeError, OSError) as exc:
            raise BadDataError(f"{Path(first.path).name}: cannot read the MRF schedule ({exc})"
                               ) from exc
        return cls(schedule, estimate_b1=False)

    @classmethod
    def members_problem(cls, members: Sequence[Member]) -> tuple[Path, str] | None:
        parts = {m.entities.get("part") for m in members}
        if parts not in ({"mag", "phase"}, {"real", "imag"}):
            return members[0].path, ("an MRF series needs a part-mag/part-phase (or "
                                     f"part-real/part-imag) pair, found parts {sorted(parts)}")
        return None

    @classmethod
    def field_supplied_elsewhere(cls, member: Member, key: str) -> bool:
        """The schedule fields may live in ``<prefix>_mrfschedule.tsv`` instead of the sidecar."""
        return key in cls.collection.array_fields and schedule_tsv_path(member.path).is_file()

    @classmethod
    def read_images(cls, members: Sequence[Member]) -> tuple[np.ndarray, np.ndarray]:
        """The complex series ``[X, Y, Z, T]`` of the pair (non-finite values set to 0)."""
        first = members[0]
        try:
            data, affine, _ = load_mrf_series(first.path, first.metadata)
        except (ValueError, KeyError, OSError) as exc:
            raise BadDataError(f"{first.path}: cannot read the MRF series ({exc})") from exc
        finite = np.isfinite(data)
        if not finite.all():
            log.warning("%s: %d non-finite values set to 0", Path(first.path).name,
                        int((~finite).sum()))
            data = np.where(finite, data, 0)
        return data, affine

    def default_prior(self) -> ParameterPrior:
        ranges = [PriorRange("T1", 0.1, 4.0, True, "s"), PriorRange("T2", 0.01, 2.0, True, "s")]
        if self.estimate_b1:
            ranges.append(PriorRange("B1", 0.7, 1.3, False, ""))
        # A known B1 (the TB1map) is a network input unless B1 is estimated: the FISP signal
        # depends on the flip angles so strongly that a B1-blind network is biased wherever B1
        # differs from 1 (the demo's WM T2 came out -13 % at B1 0.8-1.2).
        return ParameterPrior(
            self.name, tuple(ranges), "complex", (), None if self.estimate_b1 else MRF_B1_RANGE,
            "MRF T1 0.1-4 s, T2 0.01-2 s log-uniform with T2 <= T1 (the dictionary ranges of "
            "Jiang et al., MRM 2015;74:1621 and of Zhang et al. 2022); B1 0.7-1.3 when "
            "estimated, else the known relative B1+ 0.6-1.4 is a network input (head at 3 T: "
            "0.7-1.3, Sacolick et al., MRM 2010;63:1315, widened for body and 7 T; 1 when no "
            "map is given); M0 complex with a uniform phase.",
            constraint="T2<=T1")

    def derived_maps(self, values: dict[str, np.ndarray], data: np.ndarray,
                     b1: np.ndarray | None, mask: np.ndarray) -> dict[str, np.ndarray]:
        """|M0| from its real and imaginary parts (the phase is the receiver's, not tissue)."""
        if "M0_re" in values and "M0_im" in values:
            return {**values, "M0": np.hypot(values["M0_re"], values["M0_im"])}
        return values

    def dictionary(self, b1: np.ndarray | None, mask: np.ndarray
                   ) -> tuple[SignalModel, DictionaryGrid, bool]:
        """The model itself on T1 x T2; with a TB1map each voxel is matched against the atoms of
        its B1 (grid step 0.05: under 2.5 % flip-angle error), else B1 = 1 is assumed."""
        from qmri_bids.qmri.dictionary import default_mrf_grid

        b1_axis = None
        if b1 is not None:
            lo, hi = np.nanpercentile(b1[mask], [0.5, 99.5])
            b1_axis = np.arange(np.floor(lo * 20) / 20, np.ceil(hi * 20) / 20 + 1e-9, 0.05)
        return self, default_mrf_grid(b1=b1_axis), b1 is not None

    def fingerprint(
        self, t1: torch.Tensor, t2: torch.Tensor, b1: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Unit-M0 signal ``i*F+_0`` ``[..., N]`` for T1, T2 (and relative B1) of shape ``[...]``.

        Real-valued when every RF phase is 0 (then the FISP signal has a constant phase and the
        complex M0 carries all of it), complex otherwise; :meth:`forward` is always complex.
        """
        batch = torch.broadcast_shapes(t1.shape, t2.shape, () if b1 is None else b1.shape)
        dt, dev = t1.dtype, t1.device
        scale = torch.ones(batch, dtype=dt, device=dev) if b1 is None else b1.expand(batch)
        t1u, t2u = t1.unsqueeze(-1), t2.unsqueeze(-1)
        te, rest = self._te.to(dt).to(dev), self._tr_rest.to(dt).to(dev)
        # every exp of the schedule at once, outside the time loop: [..., N]
        e1_te, e2_te = torch.exp(-te / t1u), torch.exp(-te / t2u)
        e1_rest, e2_rest = torch.exp(-rest / t1u), torch.exp(-rest / t2u)
        alpha = self._alpha.to(dt).to(dev) * scale.unsqueeze(-1)
        phi = self._phi.tolist()

        inversion = self.schedule.inversion_time
        if self._real_path:
            # all pulses about x: same graph in real arithmetic (see epg.RealEPGState)
            rst = epg.equilibrium_real(batch, self.n_states, dtype=dt, device=dev)
            if inversion is not None:
                # ideal adiabatic inversion (B1-insensitive) then spoiled delay
                rst = epg.RealEPGState(rst.a, rst.b, -rst.z)
                rst = epg.relax_real(rst, *epg.relaxation_factors(inversion, t1, t2))
            out = []
            for i in range(self.n_timepoints):  # loop over time points only
                rst = epg.rf_real(rst, alpha[..., i])
                rst = epg.relax_real(rst, e1_te[..., i], e2_te[..., i])
                out.append(rst.signal())
                rst = epg.shift_real(epg.relax_real(rst, e1_rest[..., i], e2_rest[..., i]))
            return torch.stack(out, dim=-1)

        state = epg.equilibrium(batch, self.n_states, dtype=dt, device=dev)
        if inversion is not None:
            state = epg.EPGState(state.fp, state.fm, -state.z)
            state = epg.relax(state, *epg.relaxation_factors(inversion, t1, t2))
        out = []
        for i in range(self.n_timepoints):
            state = epg.rf(state, alpha[..., i], phi[i])
            state = epg.relax(state, e1_te[..., i], e2_te[..., i])
            out.append(state.signal())
            state = epg.shift(epg.relax(state, e1_rest[..., i], e2_rest[..., i]))
        return 1j * torch.stack(out, dim=-1)

    def fingerprint_derivatives(
        self, t1: torch.Tensor, t2: torch.Tensor, b1: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """Unit-M0 fingerprint and its exact derivatives by T1 and T2, ``[3, ..., N]`` (real
        path only; None when the schedule has RF phases). One simulation of the state stacked
        with its tangents (:func:`~qmri_bids.qmri.epg.relax_real_tangents`)."""
        if not self._real_path:
            return None
        batch = torch.broadcast_shapes(t1.shape, t2.shape, () if b1 is None else b1.shape)
        dt, dev = t1.dtype, t1.device
        t1, t2 = t1.expand(batch), t2.expand(batch)
        scale = torch.ones(batch, dtype=dt, device=dev) if b1 is None else b1.expand(batch)
        t1u, t2u = t1.unsqueeze(-1), t2.unsqueeze(-1)
        te, rest = self._te.to(dt).to(dev), self._tr_rest.to(dt).to(dev)

        def factors(duration: torch.Tensor) -> tuple[torch.Tensor, ...]:
            e1, e2 = torch.exp(-duration / t1u), torch.exp(-duration / t2u)
            return e1, e2, e1 * duration / t1u**2, e2 * duration / t2u**2

        f_te, f_rest = factors(te), factors(rest)
        alpha = self._alpha.to(dt).to(dev) * scale.unsqueeze(-1)
        value = epg.equilibrium_real(batch, self.n_states, dtype=dt, device=dev)
        zero = torch.zeros_like(value.a)
        rst = epg.RealEPGState(torch.stack([value.a, zero, zero]),
                               torch.stack([value.b, zero, zero]),
                               torch.stack([value.z, zero, zero]))
        inversion = self.schedule.inversion_time
        if inversion is not None:
            rst = epg.RealEPGState(rst.a, rst.b, -rst.z)
            ti = torch.as_tensor(inversion, dtype=dt, device=dev)
            rst = epg.relax_real_tangents(rst, *(f[..., 0] for f in factors(ti.reshape(1))))
        out = []
        for i in range(self.n_timepoints):
            rst = epg.rf_real(rst, alpha[..., i])
            rst = epg.relax_real_tangents(rst, *(f[..., i] for f in f_te))
            out.append(rst.signal())
            rst = epg.shift_real(epg.relax_real_tangents(rst, *(f[..., i] for f in f_rest)))
        return torch.stack(out, dim=-1)

    @property
    def has_exact_jacobian(self) -> bool:
        # B1 estimated or RF phases: :func:`~qmri_bids.qmri.crb.model_jacobian` differences
        return not self.estimate_b1 and self._real_path

    def jacobian(self, params: torch.Tensor, b1: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Signal (real view ``[..., 2N]``) and exact Jacobian ``[..., 2N, P]`` from
        :meth:`fingerprint_derivatives` (M0 enters linearly)."""
        if not self.has_exact_jacobian:
            return super().jacobian(params, b1)
        kb = None if b1 is None else torch.as_tensor(b1, dtype=params.dtype,
                                                     device=params.device)
        d = self.fingerprint_derivatives(params[..., 2], params[..., 3], kb)
        f, df1, df2 = d[0], d[1], d[2]
        m0r, m0i = params[..., 0:1], params[..., 1:2]
        zero = torch.zeros_like(f)
        signal = torch.cat([m0r * f, m0i * f], -1)
        jac = torch.stack([torch.cat([f, zero], -1), torch.cat([zero, f], -1),
                           torch.cat([m0r * df1, m0i * df1], -1),
                           torch.cat([m0r * df2, m0i * df2], -1)], -1)
        return signal, jac

    def initial_guess(self, data: torch.Tensor, b1: torch.Tensor | None = None) -> torch.Tensor:
        """NLLS start from a coarse dictionary match (T1 50 ms-4 s, T2 5 ms-2 s, 15 % steps,
        ~700 atoms, built once per model, device and dtype); the B1 parameter starts at 1 (a
        known ``b1`` multiplies it in :meth:`forward`, so 1 is the right start then too)."""
        from qmri_bids.qmri.dictionary import DictionaryMatcher, default_mrf_grid

        rdt = data.real.dtype if data.is_complex() else data.dtype
        key = (str(data.device), rdt)
        cache = self.__dict__.setdefault("_coarse_matchers", {})
        if key not in cache:
            grid = default_mrf_grid(rel_step=0.15, b1=[1.0])
            cache[key] = DictionaryMatcher(self, grid, dtype=rdt, device=data.device)
        return cache[key].match(data).params.to(rdt)

    def forward(self, params: torch.Tensor, b1: torch.Tensor | None = None) -> torch.Tensor:
        m0 = torch.complex(params[..., 0], params[..., 1])
        t1, t2 = params[..., 2], params[..., 3]
        scale = params[..., 4] if self.estimate_b1 else None
        if b1 is not None:
            b1 = torch.as_tensor(b1, dtype=params.dtype, device=params.device)
            scale = b1 if scale is None else scale * b1
        fp = self.fingerprint(t1, t2, scale)
        return m0.unsqueeze(-1) * fp.to(m0.dtype)
