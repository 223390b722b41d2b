"""Methods boilerplate (``__desc__`` style) from what actually ran, with references and versions.

The text is rendered from structured input (:class:`MethodsInput`): the software versions, the
bias-correction methods per image type, and per qMRI collection the estimators whose maps exist
(a planned estimator that crashed, or one skipped because the collection's model has no such
estimator, is not described as having run). Each paragraph appears once: collections mapped
the same way share one sentence. Rendered as Markdown, BibTeX and an HTML fragment; written as
``logs/CITATION.{md,bib,html}`` by :func:`write_citation`.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qmri_bids.reports.layout import CRBSD, ParticipantDerivatives
from qmri_bids.reports.record import RunRecord

CODE_URL = "https://github.com/qmri-bids/qmri-bids"


@dataclass(frozen=True)
class Reference:
    key: str
    text: str  # the reference as printed in a reference list
    bibtex: str


def _ref(key: str, kind: str, text: str, **fields_: str) -> Reference:
    body = ",\n".join(f"  {k} = {{{v}}}" for k, v in fields_.items())
    return Reference(key, text, f"@{kind}{{{key},\n{body}\n}}")


REFERENCES: dict[str, Reference] = {r.key: r for r in (
    _ref("qmribids", "software", f"qmri-bids developers. qmri-bids. {CODE_URL}",
         author="{qmri-bids developers}", title="qmri-bids", url=CODE_URL),
    _ref("gorgolewski2011", "article",
         "Gorgolewski K, Burns CD, Madison C, Clark D, Halchenko YO, Waskom ML, Ghosh SS. "
         "Nipype: a flexible, lightweight and extensible neuroimaging data processing framework "
         "in Python. Front Neuroinform 2011;5:13. doi:10.3389/fninf.2011.00013",
         author="Gorgolewski, Krzysztof and Burns, Christopher D. and Madison, Cindee and "
                "Clark, Dav and Halchenko, Yaroslav O. and Waskom, Michael L. and Ghosh, "
                "Satrajit S.",
         title="Nipype: a flexible, lightweight and extensible neuroimaging data processing "
               "framework in Python",
         journal="Frontiers in Neuroinformatics", volume="5", pages="13", year="2011",
         doi="10.3389/fninf.2011.00013"),
    _ref("yarkoni2019", "article",
         "Yarkoni T, Markiewicz CJ, de la Vega A, Gorgolewski KJ, Salo T, Halchenko YO, et al. "
         "PyBIDS: Python tools for BIDS datasets. J Open Source Softw 2019;4(40):1294. "
         "doi:10.21105/joss.01294",
         author="Yarkoni, Tal and Markiewicz, Christopher J. and de la Vega, Alejandro and "
                "Gorgolewski, Krzysztof J. and Salo, Taylor and Halchenko, Yaroslav O. and "
                "others",
         title="{PyBIDS}: Python tools for {BIDS} datasets",
         journal="Journal of Open Source Software", volume="4", number="40", pages="1294",
         year="2019", doi="10.21105/joss.01294"),
    _ref("gorgolewski2016", "article",
         "Gorgolewski KJ, Auer T, Calhoun VD, Craddock RC, Das S, Duff EP, et al. The brain "
         "imaging data structure, a format for organizing and describing outputs of "
         "neuroimaging experiments. Sci Data 2016;3:160044. doi:10.1038/sdata.2016.44",
         author="Gorgolewski, Krzysztof J. and Auer, Tibor and Calhoun, Vince D. and "
                "Craddock, R. Cameron and Das, Samir and Duff, Eugene P. and others",
         title="The brain imaging data structure, a format for organizing and describing "
               "outputs of neuroimaging experiments",
         journal="Scientific Data", volume="3", pages="160044", year="2016",
         doi="10.1038/sdata.2016.44"),
    _ref("karakuzu2022", "article",
         "Karakuzu A, Appelhoff S, Auer T, Boudreau M, Feingold F, Khan AR, et al. qMRI-BIDS: "
         "an extension to the brain imaging data structure for quantitative magnetic resonance "
         "imaging data. Sci Data 2022;9:517. doi:10.1038/s41597-022-01571-4",
         author="Karakuzu, Agah and Appelhoff, Stefan and Auer, Tibor and Boudreau, Mathieu "
                "and Feingold, Franklin and Khan, Ali R. and others",
         title="{qMRI-BIDS}: an extension to the brain imaging data structure for quantitative "
               "magnetic resonance imaging data",
         journal="Scientific Data", volume="9", pages="517", year="2022",
         doi="10.1038/s41597-022-01571-4"),
    _ref("paszke2019", "inproceedings",
         "Paszke A, Gross S, Massa F, Lerer A, Bradbury J, Chanan G, et al. PyTorch: an "
         "imperative style, high-performance deep learning library. Advances in Neural "
         "Information Processing Systems 32 (NeurIPS 2019), 8024-8035",
         author="Paszke, Adam and Gross, Sam and Massa, Francisco and Lerer, Adam and "
                "Bradbury, James and Chanan, Gregory and others",
         title="{PyTorch}: an imperative style, high-performance deep learning library",
         booktitle="Advances in Neural Information Processing Systems 32", pages="8024--8035",
         year="2019"),
    _ref("simko2022", "inproceedings",
         "Simkó A, Löfstedt T, Garpebring A, Nyholm T, Jonsson J. MRI bias field correction "
         "with an implicitly trained CNN. Proceedings of The 5th International Conference on "
         "Medical Imaging with Deep Learning (MIDL 2022), PMLR 172:1125-1138",
         author="Simk{\\'o}, Attila and L{\\\"o}fstedt, Tommy and Garpebring, Anders and "
                "Nyholm, Tufve and Jonsson, Joakim",
         title="{MRI} bias field correction with an implicitly trained {CNN}",
         booktitle="Proceedings of The 5th International Conference on Medical Imaging with "
                   "Deep Learning", series="Proceedings of Machine Learning Research",
         volume="172", pages="1125--1138", year="2022"),
    _ref("tustison2010", "article",
         "Tustison NJ, Avants BB, Cook PA, Zheng Y, Egan A, Yushkevich PA, Gee JC. N4ITK: "
         "improved N3 bias correction. IEEE Trans Med Imaging 2010;29(6):1310-1320. "
         "doi:10.1109/TMI.2010.2046908",
         author="Tustison, Nicholas J. and Avants, Brian B. and Cook, Philip A. and Zheng, "
                "Yuanjie and Egan, Alexander and Yushkevich, Paul A. and Gee, James C.",
         title="{N4ITK}: improved {N3} bias correction",
         journal="IEEE Transactions on Medical Imaging", volume="29", number="6",
         pages="1310--1320", year="2010", doi="10.1109/TMI.2010.2046908"),
    _ref("lowekamp2013", "article",
         "Lowekamp BC, Chen DT, Ibáñez L, Blezek D. The design of SimpleITK. Front "
         "Neuroinform 2013;7:45. doi:10.3389/fninf.2013.00045",
         author="Lowekamp, Bradley C. and Chen, David T. and Ib{\\'a}{\\~n}ez, Luis and "
                "Blezek, Daniel",
         title="The design of {SimpleITK}", journal="Frontiers in Neuroinformatics",
         volume="7", pages="45", year="2013", doi="10.3389/fninf.2013.00045"),
    _ref("zhang2022", "article",
         "Zhang X, Duchemin Q, Liu K, Gultekin C, Flassbeck S, Fernandez-Granda C, Assländer "
         "J. Cramér-Rao bound-informed training of neural networks for quantitative MRI. "
         "Magn Reson Med 2022;88(1):436-448. doi:10.1002/mrm.29206",
         author="Zhang, Xiaoxia and Duchemin, Quentin and Liu, Kangning and Gultekin, Cem and "
                "Flassbeck, Sebastian and Fernandez-Granda, Carlos and Assl{\\\"a}nder, Jakob",
         title="{Cram{\\'e}r-Rao} bound-informed training of neural networks for quantitative "
               "{MRI}",
         journal="Magnetic Resonance in Medicine", volume="88", number="1", pages="436--448",
         year="2022", doi="10.1002/mrm.29206"),
    _ref("deoni2003", "article",
         "Deoni SCL, Rutt BK, Peters TM. Rapid combined T1 and T2 mapping using gradient "
         "recalled acquisition in the steady state. Magn Reson Med 2003;49(3):515-526. "
         "doi:10.1002/mrm.10407",
         author="Deoni, Sean C. L. and Rutt, Brian K. and Peters, Terry M.",
         title="Rapid combined {T1} and {T2} mapping using gradient recalled acquisition in "
               "the steady state",
         journal="Magnetic Resonance in Medicine", volume="49", number="3", pages="515--526",
         year="2003", doi="10.1002/mrm.10407"),
    _ref("barral2010", "article",
         "Barral JK, Gudmundson E, Stikov N, Etezadi-Amoli M, Stoica P, Nishimura DG. A "
         "robust methodology for in vivo T1 mapping. Magn Reson Med 2010;64(4):1057-1067. "
         "doi:10.1002/mrm.22497",
         author="Barral, Joëlle K. and Gudmundson, Erik and Stikov, Nikola and "
                "Etezadi-Amoli, Maryam and Stoica, Petre and Nishimura, Dwight G.",
         title="A robust methodology for in vivo {T1} mapping",
         journal="Magnetic Resonance in Medicine", volume="64", number="4",
         pages="1057--1067", year="2010", doi="10.1002/mrm.22497"),
    _ref("weigel2015", "article",
         "Weigel M. Extended phase graphs: dephasing, RF pulses, and echoes - pure and simple. "
         "J Magn Reson Imaging 2015;41(2):266-295. doi:10.1002/jmri.24619",
         author="Weigel, Matthias",
         title="Extended phase graphs: dephasing, {RF} pulses, and echoes - pure and simple",
         journal="Journal of Magnetic Resonance Imaging", volume="41", number="2",
         pages="266--295", year="2015", doi="10.1002/jmri.24619"),
    _ref("ma2013", "article",
         "Ma D, Gulani V, Seiberlich N, Liu K, Sunshine JL, Duerk JL, Griswold MA. Magnetic "
         "resonance fingerprinting. Nature 2013;495(7440):187-192. doi:10.1038/nature11971",
         author="Ma, Dan and Gulani, Vikas and Seiberlich, Nicole and Liu, Kecheng and "
                "Sunshine, Jeffrey L. and Duerk, Jeffrey L. and Griswold, Mark A.",
         title="Magnetic resonance fingerprinting", journal="Nature", volume="495",
         number="7440", pages="187--192", year="2013", doi="10.1038/nature11971"),
    _ref("jiang2015", "article",
         "Jiang Y, Ma D, Seiberlich N, Gulani V, Griswold MA. MR fingerprinting using fast "
         "imaging with steady state precession (FISP) with spiral readout. Magn Reson Med "
         "2015;74(6):1621-1631. doi:10.1002/mrm.25559",
         author="Jiang, Yun and Ma, Dan and Seiberlich, Nicole and Gulani, Vikas and "
                "Griswold, Mark A.",
         title="{MR} fingerprinting using fast imaging with steady state precession ({FISP}) "
               "with spiral readout",
         journal="Magnetic Resonance in Medicine", volume="74", number="6",
         pages="1621--1631", year="2015", doi="10.1002/mrm.25559"),
    _ref("marques2010", "article",
         "Marques JP, Kober T, Krueger G, van der Zwaag W, Van de Moortele PF, Gruetter R. "
         "MP2RAGE, a self bias-field corrected sequence for improved segmentation and "
         "T1-mapping at high field. NeuroImage 2010;49(2):1271-1281. "
         "doi:10.1016/j.neuroimage.2009.10.002",
         author="Marques, José P. and Kober, Tobias and Krueger, Gunnar and van der Zwaag, "
                "Wietske and Van de Moortele, Pierre-François and Gruetter, Rolf",
         title="{MP2RAGE}, a self bias-field corrected sequence for improved segmentation and "
               "{T1}-mapping at high field",
         journal="NeuroImage", volume="49", number="2", pages="1271--1281", year="2010",
         doi="10.1016/j.neuroimage.2009.10.002"),
    _ref("helms2008", "article",
         "Helms G, Dathe H, Kallenberg K, Dechent P. High-resolution maps of magnetization "
         "transfer with inherent correction for RF inhomogeneity and T1 relaxation obtained "
         "from 3D FLASH MRI. Magn Reson Med 2008;60(6):1396-1407. doi:10.1002/mrm.21732",
         author="Helms, Gunther and Dathe, Henning and Kallenberg, Kai and Dechent, Peter",
         title="High-resolution maps of magnetization transfer with inherent correction for "
               "{RF} inhomogeneity and {T1} relaxation obtained from {3D FLASH MRI}",
         journal="Magnetic Resonance in Medicine", volume="60", number="6",
         pages="1396--1407", year="2008", doi="10.1002/mrm.21732"),
    _ref("gudbjartsson1995", "article",
         "Gudbjartsson H, Patz S. The Rician distribution of noisy MRI data. Magn Reson Med "
         "1995;34(6):910-914. doi:10.1002/mrm.1910340618",
         author="Gudbjartsson, H{\\'a}kon and Patz, Samuel",
         title="The {Rician} distribution of noisy {MRI} data",
         journal="Magnetic Resonance in Medicine", volume="34", number="6", pages="910--914",
         year="1995", doi="10.1002/mrm.1910340618"),
)}

#: signal model -> (description, references) used in the methods text
MODELS: dict[str, tuple[str, tuple[str, ...]]] = {
    "vfa": ("the spoiled gradient-echo (DESPOT1) variable flip angle signal model",
            ("deoni2003",)),
    "irt1": ("an inversion-recovery signal model", ("barral2010",)),
    "irt1-tr": (("the inversion-recovery signal model of Barral et al., which absorbs an "
                 "imperfect inversion and a finite TR"), ("barral2010",)),
    "mese-mono": ("a mono-exponential multi-echo spin-echo decay", ()),
    "mese-epg": (("an extended-phase-graph model of the multi-echo spin-echo train, which "
                  "accounts for stimulated echoes"), ("weigel2015",)),
    "megre": ("a mono-exponential multi-echo gradient-echo decay", ()),
    "mrf": ("an extended-phase-graph simulation of the FISP fingerprinting sequence",
            ("ma2013", "jiang2015", "weigel2015")),
    "mp2rage": ("the MP2RAGE signal equations", ("marques2010",)),
    "mts": ("the magnetisation-transfer saturation model", ("helms2008",)),
    "mtr": ("the magnetisation-transfer ratio", ()),
}

ESTIMATOR_TEXT = {"nlls": "non-linear least squares (bounded Levenberg-Marquardt)",
                  "dict": "dictionary matching (maximum inner product against an "
                          "SVD-compressed dictionary)"}
BIAS_TEXT = {"cnn": "a convolutional neural network trained implicitly, without bias-free "
                    "reference images",
             "n4": "N4"}


@dataclass
class BiasMethods:
    """The bias-correction methods whose outputs exist, per image type."""

    suffix: str
    methods: list[str]
    model: str | None = None  # the CNN's model name (sidecar ``Model``)
    n4_parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class CollectionMethods:
    """How one collection type was mapped, from its maps' sidecars and the run records."""

    collection: str
    model: str
    primary: str  # "nn" or "closed-form"
    references: list[str] = field(default_factory=list)  # reference estimators with maps
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (estimator, reason)
    trained_on_demand: bool = False
    b1: bool = False
    crbsd: bool = False
    noise: str | None = None


@dataclass
class MethodsInput:
    software: dict[str, str]
    device: str = "cpu"
    bias: list[BiasMethods] = field(default_factory=list)
    collections: list[CollectionMethods] = field(default_factory=list)


@dataclass
class Citation:
    markdown: str
    bibtex: str
    html: str
    references: list[Reference]


# ------------------------------------------------------------------------------ collect


def _model_of(meta: Mapping[str, Any]) -> str:
    """The signal model of a map, from ``EstimationAlgorithm`` (``..., <model> model``)."""
    algo = str(meta.get("EstimationAlgorithm", ""))
    tail = algo.rsplit(",", 1)[-1].strip()
    return tail[:-len(" model")].strip() if tail.endswith(" model") else ""


def methods_from(records: Iterable[RunRecord],
                 derivatives: Iterable[ParticipantDerivatives] = (), *,
                 planned: bool = False) -> MethodsInput:
    """What ran, merged over participants: a method counts when its outputs exist; skips come
    from the records' plans (the same skip is listed once).

    ``planned``: describe what the records plan instead (``--boilerplate-only``, before
    anything ran): every planned step counts, nothing is read from derivatives.
    """
    records = list(records)
    if planned:
        return _methods_planned(records)
    software = dict(records[-1].software) if records else {}
    device = records[-1].device if records else "cpu"
    bias: dict[str, BiasMethods] = {}
    cols: dict[str, CollectionMethods] = {}
    for deriv in derivatives:
        for anat in deriv.anat:
            entry = bias.setdefault(anat.suffix, BiasMethods(anat.suffix, []))
            for method, out in anat.methods.items():
                if method not in entry.methods:
                    entry.methods.append(method)
                if method == "cnn" and out.meta.get("Model"):
                    entry.model = str(out.meta["Model"])
                if method == "n4" and isinstance(out.meta.get("Parameters"), dict):
                    entry.n4_parameters = dict(out.meta["Parameters"])
        for col in deriv.collections:
            meta = col.common_meta
            name = col.collection
            primary = col.primary()
            algo = str(primary[0].meta.get("EstimationAlgorithm", "")) if primary else ""
            entry = cols.setdefault(name, CollectionMethods(
                name, _model_of(meta), "nn" if "network" in algo else "closed-form"))
            entry.model = entry.model or _model_of(meta)
            for ref in col.references():
                if ref not in entry.references:
                    entry.references.append(ref)
            entry.b1 = entry.b1 or bool(meta.get("B1Map"))
            entry.crbsd = entry.crbsd or any(m.desc == CRBSD for m in col.maps)
            entry.noise = entry.noise or meta.get("NoiseEstimation")
    for record in records:
        for item in record.inputs:
            if item.kind != "collection":
                continue
            entry = cols.get(item.suffix)
            if entry is None:
                continue
            for step in item.steps:
                if step.name == "train" and step.status == "planned":
                    entry.trained_on_demand = True
                if step.status == "skipped" and step.name not in [s for s, _ in entry.skipped]:
                    entry.skipped.append((step.name, step.reason))
    for entry in cols.values():
        entry.references.sort(key=lambda r: ("nlls", "dict").index(r))
    return MethodsInput(software, device, list(bias.values()), list(cols.values()))


def _methods_planned(records: list[RunRecord]) -> MethodsInput:
    software = dict(records[-1].software) if records else {}
    device = records[-1].device if records else "cpu"
    bias: dict[str, BiasMethods] = {}
    cols: dict[str, CollectionMethods] = {}
    for record in records:
        for item in record.inputs:
            planned = [s for s in item.steps if s.status == "planned"]
            if item.kind == "anat":
                entry = bias.setdefault(item.suffix, BiasMethods(item.suffix, []))
                for step in planned:
                    method = step.name.removeprefix("bias-")
                    if method not in entry.methods:
                        entry.methods.append(method)
                    if method == "cnn" and step.detail.get("model"):
                        entry.model = str(step.detail["model"])
                continue
            names = [s.name for s in planned]
            primary = "closed-form" if "closed-form" in names else "nn"
            entry = cols.setdefault(item.suffix, CollectionMethods(
                item.suffix, item.model or "", primary, crbsd=primary == "nn"))
            entry.trained_on_demand |= "train" in names
            entry.b1 |= bool(item.b1map)
            for ref in ("nlls", "dict"):
                if ref in names and ref not in entry.references:
                    entry.references.append(ref)
            for step in item.steps:
                if step.status == "skipped" and step.name not in [s for s, _ in entry.skipped]:
                    entry.skipped.append((step.name, step.reason))
    return MethodsInput(software, device, list(bias.values()), list(cols.values()))


# ------------------------------------------------------------------------------ render


def _join(items: Sequence[str]) -> str:
    items = list(items)
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


class _Cites:
    """Citation keys in order of first use, numbered."""

    def __init__(self) -> None:
        self.keys: list[str] = []

    def __call__(self, *keys: str) -> str:
        for key in keys:
            if key not in self.keys:
                self.keys.append(key)
        return "[" + ", ".join(str(self.keys.index(k) + 1) for k in keys) + "]"


def paragraphs(methods: MethodsInput, cite: _Cites) -> list[tuple[str, str]]:
    """(title, text) of the methods, in processing order, each once."""
    sw = methods.software
    out: list[tuple[str, str]] = []
    device = ("a CUDA GPU" if str(methods.device).startswith("cuda") else "the CPU")
    out.append(("Software", (
        f"Results included in this manuscript come from processing with qmri-bids "
        f"{sw.get('qmri-bids', '')} {cite('qmribids')}, which is based on Nipype "
        f"{sw.get('nipype', '')} {cite('gorgolewski2011')} and PyBIDS {sw.get('pybids', '')} "
        f"{cite('yarkoni2019')}, and reads and writes data organised according to BIDS "
        f"{cite('gorgolewski2016')}. Neural networks ran with PyTorch {sw.get('torch', '')} "
        f"{cite('paszke2019')} on {device}.").replace("  ", " ")))
    if methods.bias:
        groups: dict[tuple[str, ...], list[BiasMethods]] = {}
        for b in methods.bias:
            groups.setdefault(tuple(b.methods), []).append(b)
        sentences = []
        for combo, items in groups.items():
            parts = []
            model = next((b.model for b in items if b.model), None)
            for m in combo:
                if m == "cnn":
                    parts.append(f"{BIAS_TEXT['cnn']} {cite('simko2022')}"
                                 + (f" (model {model})" if model else ""))
                elif m == "n4":
                    params = next((b.n4_parameters for b in items if b.n4_parameters), {})
                    detail = _n4_detail(params)
                    parts.append(f"N4 {cite('tustison2010')} as implemented in SimpleITK "
                                 f"{sw.get('SimpleITK', '')} {cite('lowekamp2013')}"
                                 + (f" ({detail})" if detail else ""))
            suffixes = _join([b.suffix for b in items])
            if len(combo) > 1:
                text = (f"The {suffixes} images were corrected for intensity non-uniformity "
                        f"with {parts[0]}; for comparison, they were also corrected with "
                        f"{_join(parts[1:])}.")
            else:
                text = (f"The {suffixes} images were corrected for intensity non-uniformity "
                        f"with {parts[0]}.")
            sentences.append(text)
        sentences.append("Each method's multiplicative field estimate is stored beside the "
                         "corrected image.")
        out.append(("Intensity non-uniformity correction", " ".join(sentences)))
    nets = [c for c in methods.collections if c.primary == "nn"]
    closed = [c for c in methods.collections if c.primary != "nn"]
    if nets:
        crb = cite("zhang2022")  # cited first: numbers follow the order of the text
        models = []
        for c in nets:
            desc, refs = MODELS.get(c.model, (f"the {c.model} signal model", ()))
            models.append(f"{c.collection} with {desc}" + (f" {cite(*refs)}" if refs else ""))
        text = (f"Quantitative maps of the {_join([c.collection for c in nets])} collections "
                "were estimated with neural networks trained on signals simulated from each "
                f"acquisition protocol, with a loss normalised by the Cramér-Rao bound {crb}; "
                f"the signal models were: {'; '.join(models)}.")
        trained = [c.collection for c in nets if c.trained_on_demand]
        if trained:
            text += (f" No pretrained network matched the {_join(trained)} protocol"
                     f"{'s' if len(trained) > 1 else ''}, so one was trained on simulated "
                     "signals and validated before use.")
        b1 = [c.collection for c in nets if c.b1]
        if b1:
            text += f" A measured B1+ map entered the {_join(b1)} estimation."
        by_ref: dict[tuple[str, ...], list[str]] = {}
        for c in nets:
            if c.references:
                by_ref.setdefault(tuple(c.references), []).append(c.collection)
        if by_ref:
            clauses = [f"{_join(names)} maps by {_join([ESTIMATOR_TEXT[r] for r in refs])}"
                       for refs, names in by_ref.items()]
            text += " As references, " + clauses[0].replace(" maps by ", " maps were also "
                                                            "estimated by ", 1)
            text += "".join(f"; {c}" for c in clauses[1:]) + "."
        sd = [c.collection for c in nets if c.crbsd]
        if sd:
            noise = {c.noise for c in nets if c.crbsd and c.noise}
            if not noise:  # planned, not yet measured: the rule of the mapping
                how = ("measured in the image background (Rayleigh statistics of magnitude "
                       f"noise {cite('gudbjartsson1995')}), or from the fit residuals where "
                       "the images have no background")
            elif any("background" in n for n in noise):
                how = ("measured in the image background (Rayleigh statistics of magnitude "
                       f"noise {cite('gudbjartsson1995')})")
            else:
                how = "estimated from the fit residuals"
            text += (f" Per-voxel Cramér-Rao standard deviations {crb} were "
                     f"computed at the network estimates of {_join(sd)}, with the noise "
                     f"level {how}.")
        text += f" Maps are stored following qMRI-BIDS {cite('karakuzu2022')}."
        out.append(("Quantitative MRI", text))
    if closed:
        models = []
        for c in closed:
            desc, refs = MODELS.get(c.model, (f"the {c.model} model", ()))
            models.append(f"the {c.collection} maps from {desc}"
                          + (f" {cite(*refs)}" if refs else ""))
        text = "In closed form, " + models[0].replace(" maps from ", " maps were computed "
                                                      "from ", 1)
        out.append(("Quantitative MRI (closed form)",
                    text + "".join(f"; {m}" for m in models[1:]) + "."))
    return out


def _n4_detail(params: Mapping[str, Any]) -> str:
    if not params:
        return ""
    bits = []
    if "mask" in params:
        bits.append(f"{params['mask']} mask")
    if "shrink_factor" in params:
        bits.append(f"shrink factor {params['shrink_factor']}")
    if "n_levels" in params and "n_iterations" in params:
        bits.append(f"{params['n_levels']} levels of {params['n_iterations']} iterations")
    if "bspline_distance_mm" in params:
        bits.append(f"B-spline distance {params['bspline_distance_mm']:g} mm")
    return ", ".join(bits)


def render_citation(methods: MethodsInput) -> Citation:
    """Markdown, BibTeX and an HTML fragment of the methods and their references."""
    cite = _Cites()
    paras = paragraphs(methods, cite)
    refs = [REFERENCES[k] for k in cite.keys]
    sw = ", ".join(f"{k} {v}" for k, v in methods.software.items() if v != "not installed")
    md = ["# Methods", ""]
    for title, text in paras:
        md += [f"**{title}.** {text}", ""]
    md += ["## Software versions", "", sw, "", "## References", ""]
    md += [f"{i}. {r.text}" for i, r in enumerate(refs, 1)]
    md += ["", ("_This text was generated by qmri-bids from what ran and may be copied into "
                "a manuscript unchanged (CC0)._"), ""]
    bib = "\n\n".join(r.bibtex for r in refs) + "\n"
    parts = ['<div class="boilerplate">']
    for title, text in paras:
        parts.append(f"<p><strong>{html.escape(title)}.</strong> {html.escape(text)}</p>")
    parts.append(f"<h4>Software versions</h4><p>{html.escape(sw)}</p>")
    parts.append("<h4>References</h4><ol class=\"references\">")
    parts += [f"<li>{html.escape(r.text)}</li>" for r in refs]
    parts.append("</ol></div>")
    return Citation("\n".join(md), bib, "\n".join(parts), refs)


def write_citation(output_dir: Path, citation: Citation) -> list[Path]:
    """``logs/CITATION.md``, ``.bib`` and ``.html`` (a standalone page)."""
    from qmri_bids.artifacts import atomic_write_text

    logs = Path(output_dir) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    page = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<title>qmri-bids methods</title><style>body{font-family:system-ui,sans-serif;"
            "max-width:52em;margin:2em auto;line-height:1.45}</style></head><body>"
            f"<h1>Methods</h1>{citation.html}</body></html>\n")
    return [atomic_write_text(logs / "CITATION.md", citation.markdown),
            atomic_write_text(logs / "CITATION.bib", citation.bibtex),
            atomic_write_text(logs / "CITATION.html", page)]
