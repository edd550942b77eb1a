"""`atm chat` in a real browser: Debian's chromium driven by Playwright against the Gradio page,
which is itself a client of a real `atm serve` on the tiny GGUF.

Asks a question and sees a reply, sees a valid advice JSON with class probabilities, steps the
replay and sees the log and PnL move, and saves a screenshot to test-artifacts/.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from atm.runtime import free_port
from atm.serve.testing import ServerProcess

pytestmark = [pytest.mark.browser, pytest.mark.native, pytest.mark.slow]

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture
def page_url(tiny_gguf, atm_home, btc_parquet, tmp_path):
    port, ui_port = free_port(), free_port()
    env = {"ATM_HOME": str(atm_home), "HF_HOME": str(tmp_path / "hf"),
           "XDG_CACHE_HOME": str(tmp_path / "cache"), "GRADIO_TEMP_DIR": str(tmp_path / "gradio"),
           "GRADIO_ANALYTICS_ENABLED": "False"}
    with ServerProcess(["--model", "atm:q8", "--parallel", "2", "--ctx-size", "1024"], port, env=env,
                       log=tmp_path / "serve.log") as srv:
        srv.wait_ready(180)
        ui_log = open(tmp_path / "chat.log", "wb")
        ui = subprocess.Popen([sys.executable, "-m", "atm", "chat", "--api", srv.url, "--model", "atm:q8",
                               "--klines", str(btc_parquet), "--port", str(ui_port), "--start", "500"],
                              stdout=ui_log, stderr=subprocess.STDOUT, env={**os.environ, **env},
                              start_new_session=True)
        url = f"http://127.0.0.1:{ui_port}"
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                assert ui.poll() is None, (tmp_path / "chat.log").read_text()
                try:
                    if httpx.get(url, timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.3)
            else:
                raise AssertionError("atm chat did not come up:\n" + (tmp_path / "chat.log").read_text())
            yield url
        finally:
            ui.terminate()
            try:
                ui.wait(15)
            except subprocess.TimeoutExpired:
                ui.kill()
            ui_log.close()


def _advice_json(page) -> dict:
    return json.loads(page.inner_text("#advice-json .cm-content"))


def test_chat_page_in_chromium(page_url, tmp_path, artifacts_dir, root):
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian's chromium is not installed (apt-get install -y chromium)")
    from atm.prompting.advice import parse_advice
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(str(tmp_path / "profile"), executable_path=CHROMIUM,
                                                   headless=True, args=ARGS,
                                                   viewport={"width": 1400, "height": 1150})
        try:
            page = ctx.new_page()
            page.goto(page_url, timeout=60_000)
            # the advice for the first minute arrives from /v1/advice
            page.wait_for_function(
                "() => { const e = document.querySelector('#advice-json .cm-content');"
                " return e && e.innerText.includes('\"valid\"'); }", timeout=90_000)
            adv = _advice_json(page)
            assert adv["valid"] is True, adv
            assert adv["advice"] in ("BUY", "NOOP", "SELL")
            assert parse_advice(adv["raw"]).valid
            assert abs(sum(adv["probs"].values()) - 1) < 1e-3
            assert "open_changes" in page.inner_text("#market-state textarea") or \
                "open_changes" in page.input_value("#market-state textarea")
            assert "minute 500 " in page.inner_text("#status")

            # ask a question: a reply appears
            page.fill("#chat-input textarea", "Why this advice?")
            page.press("#chat-input textarea", "Enter")
            page.wait_for_selector('#chatbot [data-testid="bot"]', timeout=90_000)
            page.wait_for_function(
                "() => { const b = document.querySelector('#chatbot [data-testid=\"bot\"]');"
                " return b && b.innerText.trim().length > 0; }", timeout=90_000)
            assert page.inner_text('#chatbot [data-testid="user"]').strip().startswith("Why this advice?")
            reply = page.inner_text('#chatbot [data-testid="bot"]').strip()
            assert reply and not reply.startswith("(error")

            # step the replay twice: the status, the log and the advice follow minute by minute
            for minute in (501, 502):
                page.click("#step-btn")
                page.wait_for_function(
                    f"() => document.querySelector('#status').innerText.includes('minute {minute} ')"
                    " && !document.querySelector('#replay-log').innerText.includes('processing')",
                    timeout=90_000)
            log_text = page.inner_text("#replay-log")
            assert log_text.count("2025-") >= 3  # three minutes advised so far
            assert "Running PnL" in page.inner_text("#pnl")
            assert "over 2 closed minutes" in page.inner_text("#pnl")
            assert _advice_json(page)["valid"] is True
            shot = artifacts_dir / "chat.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 20_000
        finally:
            ctx.close()
    # the README's picture: written when missing or asked for (ATM_UPDATE_DOCS_IMG=1), so a test
    # run does not leave a changed tracked file behind
    img = root / "docs" / "img" / "chat.png"
    if not img.exists() or os.environ.get("ATM_UPDATE_DOCS_IMG") == "1":
        img.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, img)
