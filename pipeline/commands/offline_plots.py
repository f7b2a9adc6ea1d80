"""Make the pages that `dvc plots show` and `dvc plots diff` write work without network.

    hf-text-pipeline offline-plots          # once per clone; `make install` runs it

DVC's page loads Vega, Vega-Lite and vega-embed from a CDN, so offline it stays blank. This
writes `.dvc/plots.html`, a page template with the three libraries inlined, and names it in the
clone's own `.dvc/config.local` (`plots.html_template`), which `dvc plots show/diff` then fill.
The libraries come from vl-convert's bundle (about 0.9 MB), written here rather than kept in git;
a clone that has not run this keeps DVC's CDN page.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

TEMPLATE_NAME = "plots.html"
# DVC's plot templates are Vega-Lite 5 specs; vl-convert bundles 5.21 among its versions.
VEGA_LITE_VERSION = "5.21"
# dvc_render fills {plot_divs} (and {refresh_tag}) by plain text replacement; no {scripts}, so
# DVC adds none of its CDN script tags.
_PAGE = """<!DOCTYPE html>
<html>
<head>
    <meta charset="utf-8">
    {refresh_tag}
    <title>DVC Plot</title>
    <script>@BUNDLE@</script>
    <style>
        table {
            border-spacing: 15px;
        }
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""


def offline_template() -> str:
    """DVC's page template with vega, vega-lite and vega-embed inlined."""
    import vl_convert

    bundle = vl_convert.javascript_bundle(vl_version=VEGA_LITE_VERSION)
    # Inside an inline script, "</script" would end it; "<\/" is the same text to JavaScript.
    return _PAGE.replace("@BUNDLE@", bundle.replace("</script", "<\\/script"))


def install_template(dvc_dir: Path) -> Path:
    """Write the template into ``dvc_dir`` and name it in the clone's local DVC config."""
    from dvc.config import Config

    from pipeline.artifacts import atomic_file

    path = dvc_dir / TEMPLATE_NAME
    with atomic_file(path) as tmp:
        tmp.write_text(offline_template(), encoding="utf-8")
    with Config(dvc_dir=str(dvc_dir)).edit("local") as config:
        config.setdefault("plots", {})["html_template"] = TEMPLATE_NAME  # relative to .dvc/
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hf-text-pipeline offline-plots",
                                     description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 2)[2])
    parser.parse_args(argv)
    from dvc.exceptions import NotDvcRepoError
    from dvc.repo import Repo

    try:
        dvc_dir = Path(Repo.find_dvc_dir())
    except NotDvcRepoError:
        print(f"offline-plots: error: {Path.cwd()} is not inside a DVC project (no .dvc/ "
              "folder here or above)", file=sys.stderr)
        return 1
    path = install_template(dvc_dir)
    print(f"wrote {path}; `dvc plots show` and `dvc plots diff` pages now work offline")
    return 0
