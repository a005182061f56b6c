"""Write .dvc/plots/offline.html: DVC's plots page with vega, vega-lite and vega-embed inline.

`dvc plots show` writes a page that loads those three scripts from cdn.jsdelivr.net; with no
internet the page is blank. .dvc/config points `plots.html_template` at this file instead,
which carries the same versions DVC's page asks for (dvc_render's SCRIPTS), from the npm
registry's own packages (BSD-3-Clause, their licences kept in the file).

Run it again (network needed once) when dvc-render moves to other versions:

    python tools/vega_offline.py          # npm pack, then writes .dvc/plots/offline.html
"""

from __future__ import annotations

import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / ".dvc" / "plots" / "offline.html"
FILES = {
    "vega": "build/vega.min.js",
    "vega-lite": "build/vega-lite.min.js",
    "vega-embed": "build/vega-embed.min.js",
}


def dvc_versions() -> dict[str, str]:
    """The versions dvc-render's page loads from the CDN: the ones its specs are made for."""
    from dvc_render.vega import VegaRenderer

    found = dict(re.findall(r"npm/([a-z-]+)@([\d.]+)", VegaRenderer.SCRIPTS))
    assert set(found) == set(FILES), found
    return found


def main() -> None:
    versions = dvc_versions()
    scripts = []
    with tempfile.TemporaryDirectory() as tmp:
        specs = [f"{name}@{version}" for name, version in versions.items()]
        subprocess.run(["npm", "pack", "--silent", *specs], cwd=tmp, check=True, stdout=subprocess.DEVNULL)
        for name, version in versions.items():
            with tarfile.open(Path(tmp) / f"{name}-{version}.tgz") as tar:
                js = tar.extractfile(f"package/{FILES[name]}").read().decode("utf-8")
                licence = tar.extractfile("package/LICENSE").read().decode("utf-8")
            licence = licence.replace("--", "- -")  # no comment ends early
            js = js.replace("</script", "<\\/script")  # nor the script element
            scripts.append(
                f"<!-- {name}@{version} from the npm registry; its licence:\n{licence}-->\n<script>{js}</script>"
            )
    page = f"""<!DOCTYPE html>
<html>
<head>
    {{refresh_tag}}
    <title>DVC Plot</title>
    <!-- Written by tools/vega_offline.py: DVC's page with its scripts inline, so it renders offline. -->
    {chr(10).join(scripts)}
    <style>
        table {{
            border-spacing: 15px;
        }}
    </style>
</head>
<body>
    {{plot_divs}}
</body>
</html>
"""
    OUT.write_text(page, encoding="utf-8")
    print(
        f"wrote {OUT} ({OUT.stat().st_size // 1024} KiB): "
        + ", ".join(f"{n}@{v}" for n, v in versions.items())
    )


if __name__ == "__main__":
    sys.exit(main())
