"""The offline page template for `dvc plots show` carries the vega versions DVC's page loads."""

from __future__ import annotations

import importlib.util
import re

from conftest import ROOT


def test_offline_template_has_the_scripts_dvc_render_asks_for_and_no_cdn():
    spec = importlib.util.spec_from_file_location("vega_offline", ROOT / "tools" / "vega_offline.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    page = (ROOT / ".dvc" / "plots" / "offline.html").read_text()
    inline = dict(re.findall(r"<!-- ([a-z-]+)@([\d.]+) from the npm registry", page))
    # After a dvc-render upgrade this fails: run `python tools/vega_offline.py` again.
    assert inline == tool.dvc_versions()
    assert page.count("<script>") == 3 and "<script src=" not in page
    assert (
        "{plot_divs}" in page
        and "html_template = plots/offline.html" in (ROOT / ".dvc" / "config").read_text()
    )
