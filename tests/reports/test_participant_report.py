"""The participant report on generated trees: sections, what ran and was skipped, errors,
figures embedded, nothing external, and a report without a run record."""

from __future__ import annotations

import re
from html.parser import HTMLParser

from qmri_bids.reports import build_participant_report
from qmri_bids.reports.iqm import iqm_path
from tests.reports._trees import write_dataset


class _Collect(HTMLParser):
    """Tags, ids and external references of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: list[str] = []
        self.imgs: list[str] = []
        self.svgs = 0
        self.refs: list[str] = []
        self.scripts = 0
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a and tag != "svg" and not self._in_svg(tag):
            self.ids.append(a["id"])
        if tag == "img":
            self.imgs.append(a.get("src", ""))
        if tag == "svg":
            self.svgs += 1
        if tag == "script":
            self.scripts += 1
        for key in ("src", "href", "data", "xlink:href"):
            value = a.get(key)
            if value and not value.startswith(("#", "data:")):
                self.refs.append(value)

    def _in_svg(self, tag):
        return False

    def handle_data(self, data):
        self.text.append(data)


def parse(path) -> _Collect:
    page = _Collect()
    page.feed(path.read_text())
    return page


def test_sections_steps_and_errors(tree_reports):
    out = tree_reports["out"]
    assert tree_reports["reports"].failed == []
    html = (out / "sub-03.html").read_text()
    page = parse(out / "sub-03.html")
    text = " ".join(" ".join(page.text).split())
    for anchor in ("summary", "bias", "qmri", "methods", "errors"):
        assert f'id="{anchor}"' in html
    # summary: what ran, what was skipped (with the reason), what failed
    assert "dict: skipped" in text and "not an estimator of the vfa model" in text
    assert "nn: failed" in text  # MESE: its mapping node crashed, no maps
    assert "its JSON sidecar is not valid JSON" in text  # a skipped input
    assert "ended with status 'failed' (exit code 65)" in text
    # software, models with validation, run times
    assert "1.11.0" in text and "bias_cnn_v2" in text and "vfa-2cf98fb070e7a83e" in text
    assert "SNR 20: T1 1.012" in text
    assert "7.5 s" in text and "1.40 GB" in text
    # errors: node, message, crash file path relative to the output folder
    assert "EchoTime = 35 is outside (0, 1]" in text
    assert "sub-03/log/20260101-120000_0badc0de/crash-" in text
    assert "Errors (1)" in text
    # protocol, estimator, noise
    assert "3, 20 deg" in text and "0.015 s" in text and "0.58" in text
    assert "Rayleigh median" in text


def test_figures_embedded_and_nothing_external(tree_reports):
    out = tree_reports["out"]
    page = parse(out / "sub-01.html")
    # 2 bias panels (CNN, N4) + 3 VFA maps + 1 MRF map
    assert len(page.imgs) == 6
    assert all(src.startswith("data:image/png;base64,") and len(src) > 2000
               for src in page.imgs)
    # histograms (3 VFA maps + 1 MRF) + network-vs-NLLS (3 VFA maps)
    assert page.svgs == 7
    assert page.refs == [], page.refs
    assert page.scripts == 0
    assert len(page.ids) == len(set(page.ids))
    svg_ids = re.findall(r'<svg[\s\S]*?</svg>', (out / "sub-01.html").read_text())
    ids = [i for block in svg_ids for i in re.findall(r'\bid="([^"]+)"', block)]
    assert len(ids) == len(set(ids)), "SVG ids collide between figures"
    assert "median difference" in (out / "sub-01.html").read_text()


def test_iqm_table_written_with_the_report(tree_reports):
    out = tree_reports["out"]
    for subject in ("01", "02", "03"):
        assert iqm_path(out, subject).is_file()
    assert (out / "logs" / "CITATION.md").is_file()
    assert (out / "logs" / "CITATION.bib").is_file()
    assert (out / "logs" / "CITATION.html").is_file()


def test_report_without_run_record(tree_reports):
    path = tree_reports["out"] / "sub-02.html"
    text = " ".join(" ".join(parse(path).text).split())
    assert "none found" in text and "No errors to report." in text
    assert "Quantitative MRI" in text and "Bias-field correction" in text
    assert "No run record: inputs unknown." in text


def test_report_of_participant_without_derivatives(tmp_path):
    out = write_dataset(tmp_path / "out", n=0)
    (out / "sub-09").mkdir()
    text = " ".join(" ".join(parse(build_participant_report(out, "09")).text).split())
    assert "No derivatives were found for this participant." in text
