"""MP2RAGE closed-form signal (Marques et al., NeuroImage 2010;49:1271, appendix) and the
UNI → T1 lookup (B1-aware, as in Marques & Gruetter 2013).

Longitudinal magnetisation is propagated through one MP2RAGE cycle in closed form: adiabatic
inversion (efficiency η), free relaxation, a readout train of ``n_before + n_after`` small-angle
excitations (TR = ``tr_excitation``) whose k-space centre is at each inversion time, and so on
until ``tr_preparation``; the steady state is solved analytically. The model returns the two
(signed, real) GRE signals at the k-space centre; UNI = S1·S2 / (S1² + S2²).

Inputs (BIDS MP2RAGE collection; :meth:`MP2RAGEModel.members_problem` says what is missing):

* two signed (phase-corrected, real-valued) inversions ``inv-1``/``inv-2`` (no ``part``, or
  ``part-real``);
* two complex inversions as ``part-mag`` + ``part-phase`` (phase in radians, or in scanner units
  -4096..4095 / 0..4095, detected from the values and converted, with a log line) or
  ``part-real`` + ``part-imag``; UNI = Re(S1* S2) / (|S1|² + |S2|²) (Marques et al. 2010), which
  only needs the phase difference, so a receiver phase common to both inversions cancels;
* the scanner's ``UNIT1`` image of the collection (same entities, no ``inv``/``part``; stored as
  UNI in [-0.5, 0.5], in [0, 1] or in 12-bit scanner units 0..4095, detected and converted):
  alone (its sidecar then carries the protocol, ``InversionTime`` and ``FlipAngle`` as
  two-element arrays), beside magnitude-only inversions (which lost the sign the UNI needs: the
  UNIT1 gives the UNI, the magnitudes the object mask), or beside complete inversions (the UNI
  is computed from the inversions and compared with the UNIT1 in the log).

:meth:`MP2RAGEModel.read_images` represents every form as two signals whose UNI is the
collection's UNI (the inversions themselves where they carry their phase), so the lookup is the
same for all.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qmri_bids.errors import BadDataError
from qmri_bids.qmri import sidecar
from qmri_bids.qmri.base import (
    CLOSED_FORM,
    CollectionSpec,
    MapSpec,
    ParameterSpec,
    SignalModel,
    floats,
)
from qmri_bids.qmri.models._common import DEG, ArrayLike, as_protocol_tensor, like
from qmri_bids.qmri.models.vfa import T1_OUTPUT
from qmri_bids.qmri.prior import B1_RANGE, B1_SOURCES, T1_BRAIN_SOURCES, ParameterPrior, PriorRange

log = logging.getLogger("qmri_bids.qmri")

#: the fields of the protocol; a UNIT1 without its inversions carries them in its own sidecar
_PAIR_FIELDS = ("InversionTime", "FlipAngle")
_PART_RE = re.compile(r"_part-(mag|phase|real|imag)(?=_)")
#: |UNI(inversions) - UNIT1| median above which the two disagree (a UNI step of ~0.02 is ~3 % T1)
UNI_AGREEMENT = 0.02


def _is_unit1(member: sidecar.Member) -> bool:
    """The collection's UNIT1 image (suffix entity, or the file name where there are no
    entities, as in collections built from paths)."""
    suffix = (member.entities or {}).get("suffix")
    if suffix is not None:
        return suffix == "UNIT1"
    return re.sub(r"\.nii(\.gz)?$", "", Path(member.path).name).endswith("_UNIT1")


def _part(member: sidecar.Member) -> str:
    part = (member.entities or {}).get("part")
    if part is None:
        found = _PART_RE.search(Path(member.path).name)
        part = found.group(1) if found else ""
    return part


@dataclass
class _Inputs:
    """What an MP2RAGE collection's members are: the two inversions in TI order (each
    ``part -> member``, ``""`` for a signed real image), the UNIT1 image, and the form."""

    inversions: list[dict[str, sidecar.Member]]
    unit1: sidecar.Member | None
    form: str  # "signed", "complex", "magnitude+UNIT1", "UNIT1"
    ignored: list[tuple[sidecar.Member, str]] = field(default_factory=list)

    @property
    def first(self) -> sidecar.Member:
        """The member whose sidecar gives the timing (the first inversion, else the UNIT1)."""
        if self.inversions:
            inv = self.inversions[0]
            return next(inv[p] for p in ("", "mag", "real", "imag", "phase") if p in inv)
        assert self.unit1 is not None
        return self.unit1


def _inversion_kind(parts: frozenset[str]) -> str | None:
    """signed / complex / magnitude for a usable set of parts of one inversion, else None."""
    return {frozenset({""}): "signed", frozenset({"real"}): "signed",
            frozenset({"mag", "phase"}): "complex", frozenset({"real", "imag"}): "complex",
            frozenset({"mag"}): "magnitude"}.get(parts)


def _inputs(members: Sequence[sidecar.Member]) -> _Inputs:
    """Classify the members (no image is read); BadDataError naming the file otherwise."""
    unit1s = [m for m in members if _is_unit1(m)]
    if len(unit1s) > 1:
        raise BadDataError(f"{sidecar.member_name(unit1s[1])}: a second UNIT1 image in the MP2RAGE "
                           f"collection of {sidecar.member_name(unit1s[0])}")
    unit1 = unit1s[0] if unit1s else None
    groups: dict[str, dict[str, sidecar.Member]] = {}
    for index, member in enumerate(m for m in members if not _is_unit1(m)):
        inv = (member.entities or {}).get("inv") or f"#{index}"
        part = _part(member)
        if part in groups.setdefault(inv, {}):
            raise BadDataError(f"{sidecar.member_name(member)}: duplicates "
                               f"{sidecar.member_name(groups[inv][part])}")
        groups[inv][part] = member
    kinds = {}
    for inv, parts in groups.items():
        kind = _inversion_kind(frozenset(parts))
        if kind is None:
            first = next(iter(parts.values()))
            have = ", ".join(f"part-{p}" if p else "no part" for p in sorted(parts))
            lone = {"phase": "part-phase without its part-mag",
                    "imag": "part-imag without its part-real"}.get("".join(sorted(parts)))
            raise BadDataError(f"{sidecar.member_name(first)}: inversion {inv} has "
                               f"{lone or 'parts that do not form an image (' + have + ')'}; "
                               "an inversion is one signed image, part-mag + part-phase, or "
                               "part-real + part-imag")
        kinds[inv] = kind
    ignored: list[tuple[sidecar.Member, str]] = []
    if len(groups) not in (0, 2):
        if unit1 is None:
            names = ", ".join(sidecar.member_name(m) for g in groups.values() for m in g.values())
            raise BadDataError(f"an MP2RAGE collection needs two inversions (inv-1, inv-2) or a "
                               f"UNIT1 image; found {len(groups)} inversion(s) ({names})")
        ignored = [(m, "not two inversions: T1 from the UNIT1 image")
                   for g in groups.values() for m in g.values()]
        groups = {}
    if not groups:
        if unit1 is None:
            raise BadDataError("an MP2RAGE collection needs two inversions or a UNIT1 image")
        return _Inputs([], unit1, "UNIT1", ignored)
    inversions = sorted(groups.values(), key=lambda parts: sidecar.get_number(
        next(iter(parts.values())), "InversionTime"))
    names = ", ".join(sidecar.member_name(m) for g in inversions for m in g.values())
    magnitude = [k == "magnitude" for k in kinds.values()]
    if any(magnitude) and not all(magnitude):
        raise BadDataError(f"MP2RAGE inversions mix magnitude-only and phase-carrying images "
                           f"({names}): give both inversions with their part-phase")
    if all(magnitude):
        if unit1 is None:
            raise BadDataError(f"the MP2RAGE inversions are magnitude-only ({names}): the UNI "
                               "needs the sign of the signals; add the part-phase images or the "
                               "UNIT1 image of the collection")
        return _Inputs(inversions, unit1, "magnitude+UNIT1", ignored)
    form = "complex" if "complex" in kinds.values() else "signed"
    return _Inputs(inversions, unit1, form, ignored)


def phase_to_radians(phase: np.ndarray, name: str, units: str | None = None) -> np.ndarray:
    """A phase image in radians: its sidecar ``Units`` if given, else detected from the values
    (radians within ±π or 0..2π; scanner units -4096..4095 (× π/4096) or 0..4095 (× 2π/4096),
    their constant offset does not matter: the UNI only needs the phase difference)."""
    finite = phase[np.isfinite(phase)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    eps = 1e-2
    if units in ("rad", "radian", "radians") or (lo >= -math.pi - eps and hi <= 2 * math.pi + eps
                                                 and (lo >= -eps or hi <= math.pi + eps)):
        return phase
    if -4096.5 <= lo and hi <= 4096.5:
        scale, span = (math.pi / 4096, "-4096..4095") if lo < 0 else (2 * math.pi / 4096,
                                                                      "0..4095")
        log.info("%s: phase in scanner units (%s, values %.0f..%.0f): converted to radians "
                 "(x %.6g)", name, span, lo, hi, scale)
        return phase * scale
    raise BadDataError(f"{name}: phase values {lo:g}..{hi:g} are neither radians nor scanner "
                       "units (-4096..4095)")


def uni_from_unit1(values: np.ndarray, name: str) -> np.ndarray:
    """The UNI in [-0.5, 0.5] of a UNIT1 image stored as UNI (values below 0 exist: background,
    CSF), as UNI + 0.5 in [0, 1], or in 12-bit scanner units 0..4095 (Siemens)."""
    finite = values[np.isfinite(values)]
    if not finite.size:
        raise BadDataError(f"{name}: the UNIT1 image has no finite value")
    lo, hi = float(finite.min()), float(finite.max())
    eps = 1e-3
    if lo < 0:
        if lo >= -0.5 - eps and hi <= 0.5 + eps:
            return values
    elif hi <= 1.0 + eps:
        log.info("%s: UNIT1 stored in [0, 1]: UNI = value - 0.5", name)
        return values - 0.5
    elif hi <= 4095.0 + 0.5:
        log.info("%s: UNIT1 in scanner units (values %.0f..%.0f): UNI = value / 4095 - 0.5",
                 name, lo, hi)
        return values / 4095.0 - 0.5
    raise BadDataError(f"{name}: UNIT1 values {lo:g}..{hi:g} are neither a UNI in [-0.5, 0.5], "
                       "in [0, 1] nor 12-bit scanner units (0..4095)")


def _pair(member: sidecar.Member, key: str) -> list[float]:
    """``key`` of a UNIT1 sidecar that carries the protocol: one value per inversion."""
    value = (member.metadata or {}).get(key)
    if value is None:
        raise BadDataError(f"{sidecar.member_name(member)}: {sidecar.missing_field(key)} (a UNIT1 "
                           f"image without its inversions must list {key} of both inversions)")
    problem = (None if isinstance(value, list) and len(value) == 2
               else f"field '{key}' must list the values of both inversions, e.g. [a, b], got "
                    f"{value!r}")
    problem = problem or sidecar.field_problem(key, value, array=True)
    if problem:
        raise BadDataError(f"{sidecar.member_name(member)}: {problem}")
    return [float(v) for v in value]


def _same_shape(member: sidecar.Member, shape: tuple[int, ...], reference: sidecar.Member,
                ref_shape: tuple[int, ...]) -> None:
    if tuple(shape) != tuple(ref_shape):
        raise BadDataError(f"{sidecar.member_name(member)}: image shape {tuple(shape)} differs "
                           f"from {sidecar.member_name(reference)} {tuple(ref_shape)}")


def _read_raw(member: sidecar.Member) -> tuple[np.ndarray, np.ndarray]:
    """(3-D volume, affine) as stored: a phase or UNIT1 image is no magnitude, so no Philips
    display scaling; non-finite values set to 0."""
    import nibabel as nib

    try:
        img = nib.load(str(member.path))
        data = np.asarray(img.get_fdata(dtype=np.float64))
    except Exception as exc:  # nibabel raises several types for corrupt files
        raise BadDataError(f"{sidecar.member_name(member)}: cannot read the image ({exc})") from exc
    if data.ndim > 3 and all(n == 1 for n in data.shape[3:]):
        data = data.reshape(data.shape[:3])
    if data.ndim < 3:
        data = data.reshape(data.shape + (1,) * (3 - data.ndim))
    if data.ndim != 3:
        raise BadDataError(f"{sidecar.member_name(member)}: expected one 3-D volume, got shape "
                           f"{data.shape}")
    return np.where(np.isfinite(data), data, 0.0), np.asarray(img.affine)


def _compare_uni(from_inversions: np.ndarray, unit1: np.ndarray, signals: np.ndarray,
                 member: sidecar.Member) -> None:
    """Log how well the scanner's UNIT1 agrees with the UNI of the inversions inside the object
    (a phase convention or a denoised UNIT1 shows here); the inversions' UNI is used."""
    power = (np.abs(signals) ** 2).sum(-1)
    inside = power > 0.1 * np.percentile(power, 99) if (power > 0).any() else power > 0
    diff = float(np.median(np.abs(from_inversions[inside] - unit1[inside]))) if inside.any() \
        else float("nan")
    level = logging.WARNING if not diff <= UNI_AGREEMENT else logging.INFO
    log.log(level, "%s: UNI computed from the inversions (used) differs from this UNIT1 by a "
            "median %.3g inside the object%s", sidecar.member_name(member), diff,
            "" if level == logging.INFO else " (a phase sign convention, or a denoised UNIT1?)")


class MP2RAGEModel(SignalModel):
    name = "mp2rage"
    parameters = (
        ParameterSpec("M0", "a.u.", 0.0, float("inf"), nuisance=True),
        ParameterSpec("T1", "s", 0.05, 5.0),
    )
    # One member suffices (a lone UNIT1); members_problem checks the inversions and parts.
    collection = CollectionSpec("MP2RAGE", ("inv",),
                                ("InversionTime", "FlipAngle", "RepetitionTimeExcitation",
                                 "RepetitionTimePreparation", "NumberShots"),
                                min_members=1, description="MP2RAGE (T1, UNIT1)",
                                companion_suffixes=("UNIT1",))
    outputs = (MapSpec("UNI", "UNIT1", "arbitrary"), T1_OUTPUT)
    # T1 is a 1-D deterministic function of UNI (and B1): the lookup table is the estimator.
    closed_form = True
    estimators = (CLOSED_FORM,)
    # Members (parts, a UNIT1 without InversionTime) are ordered by the model itself (_inputs).
    order_field = None
    varying_fields = frozenset({"InversionTime", "FlipAngle"})
    fixed_roles = True

    def __init__(
        self,
        inversion_time: ArrayLike,
        flip_angle_deg: ArrayLike,
        tr_excitation: float,
        tr_preparation: float,
        n_before: int,
        n_after: int,
        inversion_efficiency: float = 0.96,
    ) -> None:
        self.inversion_time = as_protocol_tensor(inversion_time)
        self.flip_angle_deg = as_protocol_tensor(flip_angle_deg)
        if self.inversion_time.numel() != 2 or self.flip_angle_deg.numel() != 2:
            raise ValueError("MP2RAGE needs two inversion times and two flip angles")
        self.tr_excitation = float(tr_excitation)
        self.tr_preparation = float(tr_preparation)
        self.n_before, self.n_after = int(n_before), int(n_after)
        self.inversion_efficiency = float(inversion_efficiency)
        n = self.n_before + self.n_after
        ti = [float(t) for t in self.inversion_time]
        # Free-relaxation gaps between readout trains; all must be non-negative to be feasible.
        self.gaps = (
            ti[0] - self.n_before * self.tr_excitation,
            ti[1] - ti[0] - n * self.tr_excitation,
            self.tr_preparation - ti[1] - self.n_after * self.tr_excitation,
        )
        if min(self.gaps) < 0:
            raise ValueError(f"MP2RAGE timing infeasible (negative delays {self.gaps})")

    def to_protocol(self) -> dict[str, Any]:
        return {"inversion_time": floats(self.inversion_time),
                "flip_angle_deg": floats(self.flip_angle_deg),
                "tr_excitation": self.tr_excitation, "tr_preparation": self.tr_preparation,
                "n_before": self.n_before, "n_after": self.n_after,
                "inversion_efficiency": self.inversion_efficiency}

    @classmethod
    def from_sidecars(cls, members: Sequence[sidecar.Member]) -> MP2RAGEModel:
        """TIs and flip angles of the two inversions, timing from the first one's sidecar (a
        lone UNIT1: all from its sidecar, TIs and flip angles as two-element arrays); linear
        k-space ordering: the centre comes after (PF - 1/2)/PF of the acquired shots."""
        inputs = _inputs(members)
        if inputs.inversions:
            heads = [inputs.first] + [next(iter(g.values())) for g in inputs.inversions[1:]]
            ti = sidecar.numbers(heads, "InversionTime")
            sidecar.require_variation(heads, "InversionTime", ti)
            fa = sidecar.numbers(heads, "FlipAngle")
        else:
            ti, fa = (np.array(_pair(inputs.unit1, key)) for key in _PAIR_FIELDS)
            if not ti[0] < ti[1]:
                raise BadDataError(f"{sidecar.member_name(inputs.unit1)}: 'InversionTime' must "
                                   f"list the first inversion first, got {ti.tolist()}")
        first = inputs.first
        tr_exc = sidecar.repetition_time(first, True, True)
        tr_prep = sidecar.get_number(first, "RepetitionTimePreparation")
        shots = sidecar.get_number(first, "NumberShots", required=False)
        if shots is None:
            shots = sidecar.get_number(first, "EchoTrainLength", required=False)
        if shots is None:
            raise BadDataError(f"{sidecar.member_name(first)}: required field 'NumberShots' (or "
                               "'EchoTrainLength') is missing from its JSON sidecar")
        pf = sidecar.get_number(first, "PartialFourier", required=False) or 1.0
        n_before = round(shots * (pf - 0.5) / pf)
        try:
            return cls(ti, fa, tr_exc, tr_prep, n_before, int(shots) - n_before)
        except ValueError as exc:
            raise BadDataError(f"{sidecar.member_name(first)}: inconsistent MP2RAGE timing: "
                               f"{exc}") from exc

    @classmethod
    def members_problem(cls, members: Sequence[sidecar.Member]) -> tuple[Path, str] | None:
        """Two inversions (signed, part-mag + part-phase or part-real + part-imag) or a UNIT1;
        magnitude-only inversions need the UNIT1; a lone part-phase is an error."""
        try:
            _inputs(members)
        except BadDataError as exc:
            return Path(members[0].path), str(exc)
        return None

    @classmethod
    def read_images(cls, members: Sequence[sidecar.Member]) -> tuple[np.ndarray, np.ndarray]:
        """``[X, Y, Z, 2]``: two signals whose UNI is the collection's UNI (module docstring):
        the inversions where they carry their phase (complex for part pairs, real when signed),
        else pseudo-signals (r sin θ, r cos θ) with sin(2θ)/2 = the UNIT1's UNI and r the
        magnitudes' norm (1 for a lone UNIT1). Shapes must agree (BadDataError naming files)."""
        from qmri_bids.qmri.protocols import stack_member_images

        inputs = _inputs(members)
        for member, why in inputs.ignored:
            log.info("%s: not used (%s)", sidecar.member_name(member), why)
        signals, affine, reference = None, None, None
        if inputs.inversions:
            amplitude = [next(inv[p] for p in ("", "mag", "real") if p in inv)
                         for inv in inputs.inversions]
            stack, affine = stack_member_images(amplitude)  # Philips scaling, shape check
            reference = amplitude[0]
            signals = stack.astype(np.complex128) if inputs.form == "complex" else stack
            for k, inv in enumerate(inputs.inversions):
                if "phase" in inv:
                    phase, _ = _read_raw(inv["phase"])
                    _same_shape(inv["phase"], phase.shape, reference, stack.shape[:-1])
                    signals[..., k] = stack[..., k] * np.exp(1j * phase_to_radians(
                        phase, sidecar.member_name(inv["phase"]),
                        (inv["phase"].metadata or {}).get("Units")))
                elif "imag" in inv:
                    imag = stack_member_images([inv["imag"]])[0][..., 0]
                    _same_shape(inv["imag"], imag.shape, reference, stack.shape[:-1])
                    signals[..., k] = stack[..., k] + 1j * imag
        if inputs.unit1 is None:
            return signals, affine
        unit1, unit1_affine = _read_raw(inputs.unit1)
        if reference is not None:
            _same_shape(inputs.unit1, unit1.shape, reference, signals.shape[:-1])
        uni = uni_from_unit1(unit1, sidecar.member_name(inputs.unit1))
        if inputs.form in ("signed", "complex"):
            _compare_uni(cls.uni_from_signals(torch.as_tensor(signals)).numpy(), uni, signals,
                         inputs.unit1)
            return signals, affine
        radius = np.ones_like(uni) if signals is None else np.sqrt((np.abs(signals)**2).sum(-1))
        theta = 0.5 * np.arcsin(np.clip(2.0 * uni, -1.0, 1.0))
        log.info("%s: UNI from the UNIT1 image%s", sidecar.member_name(inputs.unit1),
                 "" if signals is None else " (the inversions are magnitude-only)")
        pseudo = np.stack([radius * np.sin(theta), radius * np.cos(theta)], axis=-1)
        return pseudo, affine if affine is not None else unit1_affine

    def default_prior(self) -> ParameterPrior:
        return ParameterPrior(self.name, (PriorRange("T1", 0.2, 4.0, True, "s"),), "M0", (),
                              B1_RANGE, T1_BRAIN_SOURCES + " " + B1_SOURCES)

    def closed_form_maps(self, data: np.ndarray, b1: np.ndarray | None, mask: np.ndarray
                         ) -> tuple[dict[str, np.ndarray], str]:
        """UNI of every voxel (it is defined everywhere) and T1 inside the mask."""
        uni = self.uni_from_signals(torch.as_tensor(data))
        t1 = self.t1_from_uni(uni, None if b1 is None else torch.as_tensor(b1))
        return ({"UNI": uni.numpy(), "T1": np.where(mask, t1.numpy(), np.nan)},
                "UNI lookup table (Marques et al., NeuroImage 2010)")

    def forward(self, params: torch.Tensor, b1: torch.Tensor | None = None) -> torch.Tensor:
        m0, t1 = params[..., 0], params[..., 1]
        kappa = torch.ones_like(t1) if b1 is None else torch.as_tensor(b1).to(t1)
        fa = like(self.flip_angle_deg, params) * DEG
        n = self.n_before + self.n_after
        e1 = torch.exp(-self.tr_excitation / t1)
        etd = [torch.exp(-g / t1) for g in self.gaps]
        ca = [torch.cos(kappa * fa[i]) * e1 for i in range(2)]
        sa = [torch.sin(kappa * fa[i]) for i in range(2)]
        eta = self.inversion_efficiency

        def train(mz: torch.Tensor, c: torch.Tensor, m: int) -> torch.Tensor:
            # m excitations of a spoiled train: Mz → Mz·c^m + M0(1−E1)(1−c^m)/(1−c)
            cm = c**m
            return mz * cm + m0 * (1 - e1) * (1 - cm) / (1 - c)

        # Steady state Mz just before the inversion pulse (Marques 2010, eq. A.1 ff.).
        num = m0 * (1 - etd[0])
        for k in range(2):
            num = train(num, ca[k], n)
            num = num * etd[k + 1] + m0 * (1 - etd[k + 1])
        mzss = num / (1 + eta * (ca[0] * ca[1]) ** n * etd[0] * etd[1] * etd[2])
        mz = -eta * mzss * etd[0] + m0 * (1 - etd[0])
        mz = train(mz, ca[0], self.n_before)
        s1 = sa[0] * mz
        mz = train(mz, ca[0], self.n_after)
        mz = mz * etd[1] + m0 * (1 - etd[1])
        mz = train(mz, ca[1], self.n_before)
        s2 = sa[1] * mz
        return torch.stack([s1, s2], dim=-1)

    @staticmethod
    def uni_from_signals(gre: torch.Tensor) -> torch.Tensor:
        """UNI = Re(S1* S2) / (|S1|² + |S2|²) (S1·S2 / (S1² + S2²) for real signals), in
        [−0.5, 0.5], independent of M0, T2*, the receive field and a common receiver phase."""
        s1, s2 = gre[..., 0], gre[..., 1]
        if s1.is_complex():
            return (s1.conj() * s2).real / (s1.abs() ** 2 + s2.abs() ** 2)
        return s1 * s2 / (s1**2 + s2**2)

    def uni(self, t1: torch.Tensor, b1: torch.Tensor | None = None) -> torch.Tensor:
        params = torch.stack([torch.ones_like(t1), t1], dim=-1)
        return self.uni_from_signals(self.forward(params, b1))

    def lookup_table(
        self,
        b1_grid: torch.Tensor,
        n_uni: int = 401,
        n_t1: int = 2000,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """T1 on a regular UNI grid for each B1 value: returns (uni_grid[n_uni], t1[len(b1), n_uni]).

        Only the monotonic branch of UNI(T1) between its extremes is used (UNI is ambiguous
        outside it); UNI values beyond the branch map to its end points.
        """
        dt = b1_grid.dtype
        lo, hi = self.parameters[1].lower, self.parameters[1].upper
        t1 = torch.logspace(math.log10(lo), math.log10(hi), n_t1, dtype=dt, device=b1_grid.device)
        uni_grid = torch.linspace(-0.5, 0.5, n_uni, dtype=dt, device=b1_grid.device)
        table = torch.empty(len(b1_grid), n_uni, dtype=dt, device=b1_grid.device)
        for i, kappa in enumerate(b1_grid):
            u = self.uni(t1, kappa.expand_as(t1))
            i0, i1 = sorted((int(torch.argmax(u)), int(torch.argmin(u))))
            u_b, t_b = u[i0 : i1 + 1], t1[i0 : i1 + 1]
            if u_b[0] > u_b[-1]:  # make increasing for interpolation
                u_b, t_b = u_b.flip(0), t_b.flip(0)
            table[i] = _interp(uni_grid, u_b, t_b)
        return uni_grid, table

    def t1_from_uni(
        self, uni: torch.Tensor, b1: torch.Tensor | None = None, n_b1: int = 41
    ) -> torch.Tensor:
        """T1 [s] from UNI (bilinear interpolation in the (B1, UNI) lookup table)."""
        if b1 is None:
            _, table = self.lookup_table(torch.ones(1, dtype=uni.dtype, device=uni.device))
            return _interp(uni, torch.linspace(-0.5, 0.5, table.shape[1]).to(uni), table[0])
        b1 = torch.as_tensor(b1).to(uni)
        lo, hi = float(b1.min()), float(b1.max())
        if hi - lo < 1e-6:
            hi = lo + 1e-3
        b1_grid = torch.linspace(lo, hi, n_b1, dtype=uni.dtype, device=uni.device)
        uni_grid, table = self.lookup_table(b1_grid)
        fb = ((b1 - lo) / (hi - lo) * (n_b1 - 1)).clamp(0, n_b1 - 1)
        fu = ((uni.clamp(-0.5, 0.5) + 0.5) * (len(uni_grid) - 1))
        ib0 = fb.floor().long().clamp(max=n_b1 - 2)
        iu0 = fu.floor().long().clamp(max=len(uni_grid) - 2)
        wb, wu = fb - ib0, fu - iu0
        t00, t01 = table[ib0, iu0], table[ib0, iu0 + 1]
        t10, t11 = table[ib0 + 1, iu0], table[ib0 + 1, iu0 + 1]
        return (1 - wb) * ((1 - wu) * t00 + wu * t01) + wb * ((1 - wu) * t10 + wu * t11)

    def initial_guess(self, data: torch.Tensor, b1: torch.Tensor | None = None) -> torch.Tensor:
        t1 = self.t1_from_uni(self.uni_from_signals(data), b1)
        s = self.forward(torch.stack([torch.ones_like(t1), t1], -1), b1)
        m0 = (s * data).sum(-1) / (s * s).sum(-1).clamp_min(torch.finfo(data.dtype).tiny)
        return torch.stack([m0.clamp_min(0), t1], dim=-1)


def _interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """1-D linear interpolation (numpy.interp semantics, clamped at the ends) in torch."""
    idx = torch.searchsorted(xp.contiguous(), x.contiguous()).clamp(1, len(xp) - 1)
    x0, x1, f0, f1 = xp[idx - 1], xp[idx], fp[idx - 1], fp[idx]
    w = ((x - x0) / (x1 - x0).where(x1 != x0, torch.ones_like(x1))).clamp(0, 1)
    return f0 + w * (f1 - f0)
