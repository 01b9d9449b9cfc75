"""End to end: `dart-tuner dashboard` serves the app on localhost and headless Chromium (Debian's, driven by
Playwright; no browser download) renders the Pareto chart, follows a constraint change to a new recommendation,
downloads that preset, and saves a screenshot.

Skipped when Playwright or a `chromium` binary is missing, unless DART_TUNER_REQUIRE_BROWSER=1 (CI), where that is a
failure. The screenshot goes to $DART_TUNER_ARTIFACTS/dashboard.png when set, else to the test's tmp_path.

Also a small tool: `python tests/test_dashboard_browser.py --storage URL [--study NAME] --out shot.png` serves any
storage and saves a screenshot of its dashboard (e.g. the demo study for the README).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import dashboard_study  # noqa: E402

REQUIRED = os.environ.get("DART_TUNER_REQUIRE_BROWSER") == "1"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-dev-shm-usage"]
CHART = '[data-testid="stPlotlyChart"] .main-svg'


def _browser_or_skip() -> str:
    """The chromium executable; skip (or fail under DART_TUNER_REQUIRE_BROWSER=1) when it or Playwright is missing."""
    problems = []
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        problems.append("Playwright is not installed (pip install 'dart-tuner[test]')")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        problems.append("no chromium on PATH (apt-get install -y chromium)")
    if problems:
        if REQUIRED:
            pytest.fail("DART_TUNER_REQUIRE_BROWSER=1 but " + "; ".join(problems))
        pytest.skip("; ".join(problems))
    return chromium


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def serve(storage: str, log: Path, timeout_s: float = 90.0) -> Iterator[str]:
    """`dart-tuner dashboard` on 127.0.0.1 and a free port, in its own process group; yields the URL."""
    port = _free_port()
    command = [sys.executable, "-c", "from tuner.cli import app; app()", "dashboard", "--storage", storage,
               "--port", str(port), "--address", "127.0.0.1"]
    with open(log, "w") as out:
        server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"the dashboard exited with {server.returncode}:\n{log.read_text()}")
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                    if response.read().strip() == b"ok":
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the dashboard did not answer within {timeout_s:.0f} s:\n{log.read_text()}")
            time.sleep(0.3)
        yield url
    finally:
        server.terminate()  # the command forwards SIGTERM to the streamlit server it started
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)  # our own process group only
            server.wait()


@contextmanager
def open_page(chromium: str, url: str, width: int = 1400, height: int = 1800) -> Iterator[object]:
    """A headless Chromium page on the dashboard, once its Pareto chart has rendered."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height}, accept_downloads=True)
            page.goto(url)
            page.wait_for_selector(CHART, timeout=90_000)
            yield page
        finally:
            browser.close()


def recommended_trial(page: object) -> object:
    """The locator of the 'Recommended trial' metric's value."""
    return page.locator('[data-testid="stMetric"]', has_text="Recommended trial").locator(
        '[data-testid="stMetricValue"]')


def artifacts_dir(tmp_path: Path) -> Path:
    """$DART_TUNER_ARTIFACTS (created) when set, else the test's tmp_path."""
    chosen = os.environ.get("DART_TUNER_ARTIFACTS")
    path = Path(chosen) if chosen else tmp_path
    path.mkdir(parents=True, exist_ok=True)
    return path


def test_dashboard_in_headless_chromium(tmp_path: Path) -> None:
    """Served app: chart renders, a stricter accuracy floor moves the recommendation, its preset downloads."""
    chromium = _browser_or_skip()
    from playwright.sync_api import expect

    from tuner import load_preset

    storage = f"sqlite:///{tmp_path / 'dash.db'}"
    dashboard_study.build_study(storage)
    with serve(storage, tmp_path / "server.log") as url, open_page(chromium, url) as page:
        expect(recommended_trial(page)).to_have_text("#6", timeout=30_000)  # >= 90% of the baseline
        assert page.locator(CHART).first.locator(".scatterlayer .point").count() >= 12

        thumb = page.get_by_role("slider").first  # minimum accuracy, % of the baseline, step 0.5
        thumb.focus()
        for _ in range(10):
            page.keyboard.press("ArrowRight")
        expect(recommended_trial(page)).to_have_text("#1", timeout=30_000)  # >= 95%: the fastest is trial 1
        legend = page.locator('[data-testid="stPlotlyChart"]').first.get_by_text("recommended: trial 1")
        expect(legend).to_be_visible(timeout=30_000)  # the Pareto chart redrew with the new point
        page.wait_for_timeout(500)  # let plotly finish drawing before the picture
        shot = artifacts_dir(tmp_path) / "dashboard.png"
        page.screenshot(path=str(shot))
        assert shot.stat().st_size > 20_000

        with page.expect_download(timeout=30_000) as download:
            page.get_by_role("button", name="Download the preset of trial 1").click()
        saved = tmp_path / download.value.suggested_filename
        download.value.save_as(saved)
    assert saved.name == "dash-trial1.yaml"
    preset = load_preset(saved)
    assert preset.provenance["trial"] == 1 and preset.config.method == "dart"


def main() -> None:
    """Serve a storage and save a screenshot of its dashboard (optionally of one study)."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--storage", required=True)
    parser.add_argument("--study", help="study to show (default: the first in the picker)")
    parser.add_argument("--out", type=Path, default=Path("dashboard.png"))
    parser.add_argument("--width", type=int, default=1400)
    parser.add_argument("--height", type=int, default=1800)
    args = parser.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("no chromium on PATH")
    log = args.out.with_suffix(".server.log")
    with serve(args.storage, log) as url, open_page(chromium, url, args.width, args.height) as page:
        if args.study:
            page.locator('[data-testid="stSidebar"] [data-testid="stSelectbox"]').click()
            page.get_by_role("option", name=args.study).first.click()
            page.wait_for_timeout(2000)
            page.wait_for_selector(CHART, timeout=90_000)
        page.wait_for_timeout(1000)
        page.screenshot(path=str(args.out))
    log.unlink(missing_ok=True)
    print(args.out)


if __name__ == "__main__":
    main()
