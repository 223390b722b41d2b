"""The reports in a real browser: headless Chromium (the Debian package), pages opened from
disk with the network off; no console error, no request leaving the machine, every figure
rendered; screenshots kept in .ci/artifacts/ (CI artefacts, git-ignored)."""

from __future__ import annotations

import pytest

from tests.reports.conftest import chromium_path

pytestmark = pytest.mark.skipif(
    chromium_path() is None,
    reason="no Chromium: install the Debian packages chromium and chromium-driver "
           "(.ci/run does it in CI)")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from tests.reports._cdp import Browser

    b = Browser(chromium_path(), tmp_path_factory.mktemp("chromium-profile"))
    yield b
    b.close()


def _check(report: dict, min_figures: int) -> None:
    assert report["console_errors"] == [] and report["exceptions"] == []
    assert report["log_errors"] == [], report["log_errors"]
    assert report["external"] == [] and report["failed"] == []
    figures = report["figures"]
    assert len(figures) >= min_figures
    bad = [f for f in figures if not f["ok"]]
    assert bad == [], bad


def test_the_check_catches_a_page_that_uses_the_network(browser, tmp_path):
    """The harness itself: external requests and console errors are seen (so a report that
    fetched anything would fail the tests below)."""
    from tests.reports._cdp import open_page

    page = tmp_path / "bad.html"
    page.write_text('<html><head><script src="https://code.jquery.com/jquery.js"></script>'
                    '</head><body><div class="reportlet" id="x"><img src="http://example.org/'
                    'a.png"></div><script>console.error("boom")</script></body></html>')
    report = open_page(browser, page.as_uri())
    assert "https://code.jquery.com/jquery.js" in report["external"]
    assert "http://example.org/a.png" in report["external"]
    assert report["console_errors"] == ["boom"]
    assert [f["ok"] for f in report["figures"]] == [False]


def test_participant_and_group_reports_render_offline(browser, pipeline_run, artifacts):
    from tests.reports._cdp import open_page

    out = pipeline_run["out"]
    sub = open_page(browser, (out / "sub-01.html").as_uri(),
                    screenshot=artifacts / "sub-01.png")
    # bias: T1w and T2w x (CNN, N4); qMRI figures when collections ran
    _check(sub, 4)
    assert sub["title"] == "sub-01: qmri-bids report"
    # the README's figure: the bias-correction section, CNN and N4 side by side
    open_page(browser, (out / "sub-01.html").as_uri(), screenshot=artifacts / "sub-01-bias.png",
              clip_selector="#bias", clip_height=1500)
    group = open_page(browser, (out / "group_report.html").as_uri(),
                      screenshot=artifacts / "group_report.png")
    _check(group, 1)
    assert (artifacts / "sub-01.png").stat().st_size > 50_000


def test_qmri_figures_render_offline(browser, tree_reports, artifacts):
    """Every kind of figure (maps with CRB SD, histograms, network-vs-NLLS) on the generated
    tree, whatever collections the pipeline run could map."""
    from tests.reports._cdp import open_page

    report = open_page(browser, (tree_reports["out"] / "sub-01.html").as_uri(),
                       screenshot=artifacts / "tree-sub-01.png")
    _check(report, 13)
    kinds = {f["kind"] for f in report["figures"]}
    assert kinds == {"png", "svg"}
    citation = open_page(browser, (tree_reports["out"] / "logs" / "CITATION.html").as_uri())
    assert citation["console_errors"] == [] and citation["external"] == []
