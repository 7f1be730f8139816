"""Render a uflow report.html in headless Chromium: fail if any image is missing, save a screenshot.

    python scripts/check_report.py demo_output/report.html --screenshot report.png

Chromium loads a copy of the page (next to it, so relative links resolve) with
one added script that lists the images that did not load; the copy is removed
afterwards. Needs a Chromium binary (Debian: apt-get install chromium).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

PROBE = (
    "<script>window.addEventListener('load', () => {"
    "const broken = [...document.images].filter(i => !i.complete || i.naturalWidth === 0).map(i => i.getAttribute('src'));"
    "document.body.setAttribute('data-images', document.images.length);"
    "document.body.setAttribute('data-broken', JSON.stringify(broken));});</script>"
)
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--allow-file-access-from-files",
    "--virtual-time-budget=10000",
]


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    return None


def check(report: Path, screenshot: Path | None, chromium: str) -> tuple[int, list[str]]:
    """(number of images on the page, images that failed to load)."""
    report = report.resolve()
    page = report.read_text(encoding="utf-8")
    probe = report.with_name(f".probe-{report.name}")
    probe.write_text(page.replace("</body>", PROBE + "</body>"), encoding="utf-8")
    with tempfile.TemporaryDirectory() as profile:
        try:
            dom = subprocess.run(
                [chromium, *FLAGS, f"--user-data-dir={profile}", "--dump-dom", probe.as_uri()],
                capture_output=True, text=True, timeout=120, check=True,
            ).stdout
            if screenshot is not None:
                subprocess.run(
                    [chromium, *FLAGS, f"--user-data-dir={profile}", f"--screenshot={screenshot.resolve()}", "--window-size=1280,2400", report.as_uri()],
                    capture_output=True, text=True, timeout=120, check=True,
                )
        finally:
            probe.unlink(missing_ok=True)
    count = re.search(r'data-images="(\d+)"', dom)
    broken = re.search(r"data-broken=\"([^\"]*)\"", dom)
    if count is None or broken is None:
        raise RuntimeError("the page did not finish loading in Chromium")
    return int(count.group(1)), json.loads(broken.group(1).replace("&quot;", '"'))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", type=Path)
    parser.add_argument("--screenshot", type=Path, default=None)
    args = parser.parse_args()
    chromium = find_chromium()
    if chromium is None:
        print("no Chromium found (apt-get install chromium)", file=sys.stderr)
        return 2
    count, broken = check(args.report, args.screenshot, chromium)
    print(f"{args.report}: {count} images, {len(broken)} missing" + (f": {', '.join(broken)}" if broken else ""))
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
