"""The screenshots of the html report in the docs (docs/images/html-probe.png, html-run.png).

    python benchmarks/html_screenshots.py                 # both, into docs/images/
    python benchmarks/html_screenshots.py --out /tmp/shots --width 1280

Runs the two reports as a user would --

  * probe  `netdoctor probe fixtures/sick/lenet_sigmoid.py:LeNet --data synthetic --steps 100
           --format html -o ...` (`--steps 100`: the README's probe, without the time budget
           that fits the steps to the machine)
  * run    `netdoctor run --format html -o ... fixtures/loops/vanishing.py`

-- opens each page in headless Chromium (the system's `chromium`, driven by playwright, offline)
and takes a full-page screenshot, stored as a 256-colour PNG (Pillow) to keep the docs small.
Needs the [test] and [html] extras and Debian's chromium (`apt-get install chromium`).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REPORTS = {
    "html-probe": (
        "probe",
        "fixtures/sick/lenet_sigmoid.py:LeNet",
        "--data",
        "synthetic",
        "--steps",
        "100",
        "--format",
        "html",
        "-o",
        "{out}",
    ),
    "html-run": ("run", "--format", "html", "-o", "{out}", "fixtures/loops/vanishing.py"),
}


def report(name: str, out: Path) -> None:
    """The page of REPORTS[name], written to `out` by netdoctor in its own process."""
    args = [str(out) if a == "{out}" else a for a in REPORTS[name]]
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-m", "netdoctor", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if not out.is_file():
        sys.exit(f"netdoctor {' '.join(args)} wrote no report:\n{proc.stderr}")


def screenshot(page_path: Path, png: Path, width: int, chromium: str) -> None:
    from io import BytesIO

    from PIL import Image
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium)
        try:
            context = browser.new_context(offline=True, viewport={"width": width, "height": 900})
            page = context.new_page()
            page.goto(page_path.as_uri(), wait_until="load")
            page.wait_for_function(
                "() => Array.from(document.querySelectorAll('figure.chart'))"
                ".every(f => f.querySelector('svg.main-svg'))"
            )
            shot = page.screenshot(full_page=True)
        finally:
            browser.close()
    image = Image.open(BytesIO(shot)).convert("RGB")
    image.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(png, optimize=True)
    print(f"{png}: {image.width}x{image.height}, {png.stat().st_size // 1024} KB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "images")
    ap.add_argument("--width", type=int, default=1280, help="viewport width in CSS pixels")
    ap.add_argument("--only", choices=sorted(REPORTS), help="one of the two")
    args = ap.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.exit("no chromium on PATH (Debian: apt-get install chromium)")
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name in [args.only] if args.only else REPORTS:
            page = Path(tmp) / f"{name}.html"
            report(name, page)
            screenshot(page, args.out / f"{name}.png", args.width, chromium)


if __name__ == "__main__":
    main()
