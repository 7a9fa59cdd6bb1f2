"""A screenshot of `mlkd serve`'s page in headless Chromium (Playwright), with an image picked and answered:
how docs/images/serve_page.png was made.

Run: ``python benchmarks/page_screenshot.py --model runs/demo/seed0/teacher/last.pt --image IMAGE
--out docs/images/serve_page.png [--chromium /usr/bin/chromium]``.
"""

from __future__ import annotations

import argparse
import shutil
import threading
import time

import uvicorn
from playwright.sync_api import sync_playwright

import mlkd
from mlkd.serve.app import ServeSettings, create_app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--image", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--chromium", default=shutil.which("chromium"))
    args = parser.parse_args()
    server = uvicorn.Server(uvicorn.Config(create_app(mlkd.load(args.model), ServeSettings()), host="127.0.0.1",
                                           port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    url = "http://127.0.0.1:%d/" % server.servers[0].sockets[0].getsockname()[1]
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=args.chromium, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1000, "height": 660})
            page.goto(url)
            page.wait_for_function("document.getElementById('model').textContent.includes('classes')")
            page.set_input_files("#file", args.image)
            page.wait_for_selector("#labels .bar")
            page.screenshot(path=args.out)
            browser.close()
    finally:
        server.should_exit = True
        thread.join(30)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
