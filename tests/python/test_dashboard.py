"""The live dashboard of ``aex serve`` in a real browser (headless Chromium driven by Selenium):
load it, make governed calls over HTTP and in-process, and watch the page's numbers, events,
denials and audit status change. A screenshot is kept in ``target/artifacts/``."""

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest

import aex
from conftest import assert_clean
from provider import Provider

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (scripts/test installs it)")
from selenium.common.exceptions import StaleElementReferenceException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="chromium and chromium-driver are not installed (scripts/missing-packages names them)")
ARTIFACTS = Path(__file__).resolve().parents[2] / "target" / "artifacts"
MSGS = [{"role": "user", "content": "hello"}]


@pytest.fixture
def gateway(tmp_path):
    provider = Provider()
    config = tmp_path / "models.yaml"
    config.write_text(f"""
providers:
  local: {{base_url: "{provider.url}"}}
models:
  mini: {{provider: local, input_price: 1, output_price: 2, max_output_tokens: 1000}}
""")
    db = str(tmp_path / "aex.db")
    env = dict(os.environ, AEX_TEST_ADMIN="admin-s3cret")
    proc = subprocess.Popen(
        [sys.executable, "-m", "aex", "--db", db, "--config", str(config), "serve", "--port", "0", "--admin-token-env", "AEX_TEST_ADMIN"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    line = proc.stdout.readline()
    assert "listening on" in line, line + proc.stderr.read()
    url = line.split("listening on ")[1].split()[0]
    yield url.removesuffix("/v1"), aex.Kernel(db, config=str(config)), db
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    provider.stop()


@pytest.fixture
def browser(tmp_path):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1400,900", f"--user-data-dir={tmp_path / 'chromium'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    yield driver
    driver.quit()


def wait_for(predicate, what, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except StaleElementReferenceException:  # the page re-rendered under us: look again
            value = None
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"the page never showed {what}")


def cell(browser, agent, name):
    rows = browser.find_elements(By.CSS_SELECTOR, f'#agents tr[data-agent="{agent}"] td.{name}')
    return rows[0].text if rows else None


def test_the_dashboard_follows_spend_denials_and_events_live(gateway, browser):
    base, k, db_file = gateway
    # Without the admin token: refused.
    browser.get(f"{base}/dashboard")
    assert "admin_token_required" in browser.page_source
    # With it: a cookie is set and the page loads.
    browser.get(f"{base}/dashboard?token=admin-s3cret")
    assert browser.current_url.endswith("/dashboard")
    wait_for(lambda: "clean" in browser.find_element(By.ID, "audit").text, "a clean audit")

    http_token = k.create_agent("http-agent", "1.00")
    local_token = k.create_agent("local-agent", "0.001")  # 1,000 micro-USD: one call's reservation is 2,100
    wait_for(lambda: cell(browser, "http-agent", "spent") == "$0.00", "the new agents")
    wait_for(lambda: cell(browser, "local-agent", "budget") == "$0.001", "the budget")

    with openai.OpenAI(base_url=f"{base}/v1", api_key=http_token, max_retries=0) as client:
        client.chat.completions.create(model="mini", messages=MSGS)
        client.chat.completions.create(model="mini", messages=MSGS, stream=True, stream_options={"include_usage": True}).close()
    with pytest.raises(aex.errors.InsufficientBudget):
        k.chat(local_token, model="mini", messages=MSGS)

    spent = k.agent("http-agent")["spent_micro"]
    assert spent > 0
    wait_for(lambda: cell(browser, "http-agent", "spent") == "$" + aex.format_usd(spent), f"http-agent's spend of {spent}")
    wait_for(lambda: browser.find_element(By.CSS_SELECTOR, '#denials tr[data-reason="budget_exceeded"] td.count').text == "1", "the denial")
    wait_for(lambda: {"execution.committed", "admission.denied"} <= {e.text for e in browser.find_elements(By.CSS_SELECTOR, "#events td.kind")}, "the events")
    wait_for(lambda: cell(browser, "http-agent", "burn") == "$" + aex.format_usd(spent), "the burn rate")
    wait_for(lambda: cell(browser, "http-agent", "reserved") == "$0.00", "nothing reserved")
    head = k.head()
    wait_for(lambda: browser.find_element(By.ID, "head").text == head, "the ledger head")

    # Severing an agent shows at once.
    k.disable("http-agent")
    wait_for(lambda: cell(browser, "http-agent", "state") == "disabled", "the agent disabled")
    wait_for(lambda: "through event " + head.split(":")[0] in browser.find_element(By.ID, "audit").text, "the audit of the newest events")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "dashboard.png"))
    assert (ARTIFACTS / "dashboard.png").stat().st_size > 10_000
    assert_clean(k)

    # Someone lowers what an agent has spent, adding no ledger event: the page says so within
    # the audit's maximum age (AUDIT_MAX_AGE, 10 s), without waiting for the ledger to grow.
    with sqlite3.connect(db_file) as db:
        db.execute("UPDATE agents SET spent_micro = 0 WHERE name = 'http-agent'")
    wait_for(lambda: "FAILED" in browser.find_element(By.ID, "audit").text, "the failed audit", timeout=30)
