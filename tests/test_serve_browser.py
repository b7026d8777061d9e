"""The page as a person uses it: `genattr serve` in a subprocess on a loopback port, headless
Chromium (Debian's `chromium`, driven by Playwright) uploads a generated image and waits for
the ranked training images. The screenshot is kept in tests/artifacts/ (not committed).
Skips where chromium or Playwright is missing (`apt-get install chromium`)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import SERVE_GALLERY as N_GALLERY

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    pytest.skip("no chromium on this machine (apt-get install chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api")
ARTIFACTS = Path(__file__).parent / "artifacts"
TOP_K = 6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tiny_index, tmp_path):
    index, calibrator, _ = tiny_index
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "genattr.cli", "serve", "--index", str(index)]
    cmd += ["--calibrator", str(calibrator), "--port", str(port), "--threads", "1"]
    log = (tmp_path / "server.log").open("w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(url + "/healthz", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail("server did not start:\n" + (tmp_path / "server.log").read_text())
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_upload_in_chromium_shows_ranked_results(server, world_data, tiny_index, tmp_path):
    _, _, rows = tiny_index
    generated = tmp_path / "generated.png"
    Image.fromarray(world_data.images[int(rows[5])]).resize((128, 128)).save(generated)
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "serve_page.png"
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(server + "/")
            page.fill("#topk", str(TOP_K))
            page.set_input_files("#file", str(generated))
            page.wait_for_selector("#results[data-state=done]", timeout=30_000)
            page.wait_for_function(
                "[...document.querySelectorAll('#results img')]"
                ".every(i => i.complete && i.naturalWidth > 0)",
                timeout=30_000,
            )
            figures = page.query_selector_all("#results figure")
            assert len(figures) == TOP_K <= N_GALLERY
            assert figures[0].inner_text().startswith("#1")
            assert world_data.records[int(rows[5])]["caption"] in figures[0].inner_text()
            widths = page.eval_on_selector_all("#results img", "xs => xs.map(x => x.width)")
            assert widths == sorted(widths, reverse=True)  # sized by influence
            assert "Influence outside these" in page.inner_text("#remaining")
            assert page.eval_on_selector("#query img", "x => x.naturalWidth") == 128
            # The header says what is served (GET /about).
            page.wait_for_function(
                "document.getElementById('served').textContent.startsWith('Serving')",
                timeout=10_000,
            )
            assert "backbone pixel" in page.inner_text("#served")
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    print(f"screenshot: {shot}")
    assert shot.stat().st_size > 0
