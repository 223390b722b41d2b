"""Methods boilerplate from what ran: each paragraph once, skipped estimators not claimed,
references numbered in order of use, software versions, md/bib/html outputs."""

from __future__ import annotations

import re

from qmri_bids.reports.citation import (
    REFERENCES,
    BiasMethods,
    CollectionMethods,
    MethodsInput,
    methods_from,
    render_citation,
    write_citation,
)
from qmri_bids.reports.layout import scan_participant
from qmri_bids.reports.record import latest_run_record

SOFTWARE = {"qmri-bids": "0.1.0", "nipype": "1.11.0", "pybids": "0.22.0", "torch": "2.13.0",
            "SimpleITK": "2.5.7"}


def _cited_numbers(text: str) -> list[int]:
    return [int(n) for group in re.findall(r"\[([\d, ]+)\]", text) for n in group.split(",")]


def check_references(citation) -> None:
    """Every reference is cited, numbered in order of first citation, and has one BibTeX
    entry."""
    numbers = _cited_numbers(citation.markdown.split("## Software versions")[0])
    first = list(dict.fromkeys(numbers))
    assert first == list(range(1, len(citation.references) + 1))
    keys = re.findall(r"^@\w+\{([^,]+),", citation.bibtex, re.MULTILINE)
    assert keys == [r.key for r in citation.references]
    assert len(set(keys)) == len(keys)
    assert citation.bibtex.count("{") == citation.bibtex.count("}")


def test_from_the_tree_skipped_dictionary_is_not_claimed(tree):
    records = [r for s in ("01", "02", "03") if (r := latest_run_record(tree, s))]
    assert len(records) == 2  # sub-02 has none
    derivs = [scan_participant(tree, s) for s in ("01", "02", "03")]
    methods = methods_from(records, derivs)
    vfa = next(c for c in methods.collections if c.collection == "VFA")
    assert vfa.references == ["nlls"]
    assert vfa.skipped == [("dict", "not an estimator of the vfa model (it has nn, nlls)")]
    assert vfa.model == "vfa" and vfa.b1 and vfa.crbsd
    # MESE crashed: no maps, so it is not described at all
    assert {c.collection for c in methods.collections} == {"VFA", "MRF"}
    cit = render_citation(methods)
    text = cit.markdown
    assert "dictionary matching" not in text and "MESE" not in text
    assert "non-linear least squares" in text
    assert "VFA and MRF collections" in text or "MRF and VFA collections" in text
    for name, version in SOFTWARE.items():
        assert f"{version}" in text, name
    # each paragraph once, although three participants contribute
    assert text.count("were corrected for intensity non-uniformity") == 1
    assert text.count("Quantitative maps of") == 1
    check_references(cit)
    assert "Tustison" in text and "Simkó" in text and "Deoni" in text


def test_combinations_render_once_each():
    methods = MethodsInput(SOFTWARE, "cuda", [
        BiasMethods("T1w", ["cnn", "n4"], "bias_cnn_v2", {"shrink_factor": 4}),
        BiasMethods("T2w", ["cnn", "n4"]), BiasMethods("FLAIR", ["n4"])], [
        CollectionMethods("MESE", "mese-mono", "nn", ["nlls", "dict"], crbsd=True,
                          noise="residuals of the fit inside the object"),
        CollectionMethods("IRT1", "irt1-tr", "nn", ["nlls"], trained_on_demand=True),
        CollectionMethods("MTR", "mtr", "closed-form")])
    cit = render_citation(methods)
    text = cit.markdown
    assert "The T1w and T2w images were corrected" in text
    assert "The FLAIR images were corrected for intensity non-uniformity with N4" in text
    assert "shrink factor 4" in text and "on a CUDA GPU" in text
    assert "No pretrained network matched the IRT1 protocol" in text
    assert ("MESE maps were also estimated by non-linear least squares (bounded "
            "Levenberg-Marquardt) and dictionary matching") in text
    assert "; IRT1 maps by non-linear least squares" in text
    assert "estimated from the fit residuals" in text
    assert "In closed form, the MTR maps were computed from the magnetisation-transfer ratio." \
        in text
    check_references(cit)
    assert "<ol class=\"references\">" in cit.html and "<script" not in cit.html


def test_write_citation_files(tmp_path):
    cit = render_citation(MethodsInput(SOFTWARE))
    paths = write_citation(tmp_path, cit)
    assert [p.name for p in paths] == ["CITATION.md", "CITATION.bib", "CITATION.html"]
    assert (tmp_path / "logs" / "CITATION.md").read_text() == cit.markdown
    assert "qmribids" in (tmp_path / "logs" / "CITATION.bib").read_text()
    page = (tmp_path / "logs" / "CITATION.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "Nipype" in page


def test_reference_database_is_well_formed():
    for key, ref in REFERENCES.items():
        assert ref.bibtex.startswith("@") and f"{{{key}," in ref.bibtex
        assert ref.bibtex.count("{") == ref.bibtex.count("}"), key
        assert "year" in ref.bibtex or key == "qmribids"


def test_boilerplate_from_the_plan_alone(tmp_path):
    """``--boilerplate-only``: the records' plans, no derivatives."""
    from tests.reports._trees import make_record

    rec = make_record(tmp_path, "01", ("cnn", "n4"), ("nlls",), None)
    methods = methods_from([rec], planned=True)
    assert [(b.suffix, b.methods) for b in methods.bias] == [("T1w", ["cnn", "n4"])]
    vfa, mese = methods.collections
    assert (vfa.collection, vfa.references, vfa.b1) == ("VFA", ["nlls"], True)
    assert vfa.skipped and mese.references == []
    text = render_citation(methods).markdown
    assert "or from the fit residuals where the images have no background" in text
    assert "dictionary matching" not in text
    check_references(render_citation(methods))
