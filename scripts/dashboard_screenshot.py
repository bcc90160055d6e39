"""Screenshot of the dashboard during `boldstream demo`, for the README.

Runs the demo (simulated scanner -> live boldstream), waits for its summary,
then renders the dashboard in Debian's headless chromium via Playwright.

    python scripts/dashboard_screenshot.py [--out docs/images/dashboard-demo.png]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from playwright.sync_api import sync_playwright

FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=Path("docs/images/dashboard-demo.png"))
    ap.add_argument("--volumes", type=int, default=90)
    args = ap.parse_args()
    demo = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "boldstream",
            "demo",
            "--hold",
            "--volumes",
            str(args.volumes),
            "--motion",
            "mild",
            "--pace",
            "20",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert demo.stdout is not None
        url = None
        for line in demo.stdout:
            if m := re.match(r"dashboard on (\S+)", line):
                url = m.group(1)
            if line.startswith("holding:"):
                break
        if url is None:
            raise SystemExit("the demo did not print its dashboard URL")
        with sync_playwright() as p, tempfile.TemporaryDirectory() as profile:
            browser = p.chromium.launch_persistent_context(
                profile,
                executable_path="/usr/bin/chromium",
                headless=True,
                args=FLAGS,
                viewport={"width": 1600, "height": 1000},
            )
            page = browser.new_page()
            page.goto(url)
            page.wait_for_function("document.body.innerText.includes('good data')", timeout=30_000)
            page.wait_for_timeout(1500)  # let the last chart frame paint
            args.out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(args.out), full_page=True)
            browser.close()
        print(f"wrote {args.out}")
    finally:
        demo.terminate()
        demo.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
