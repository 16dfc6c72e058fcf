"""The console's pages in a real browser (Debian's chromium through chromedriver), against a
real cluster: a coordinator and workers hosting `workers` (BuildAndDeploy), and
`orchestrator console` as a subprocess.

Synchronisation is by deadlines only (WebDriverWait, `wait_for`), never by sleeping.
Set ORCHESTRATOR_CONSOLE_SCREENSHOT=docs/console-run.png to refresh the README's picture.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from tests.conftest import Cluster, wait_for

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
pytestmark = pytest.mark.skipif(
    not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)),
    reason="needs Debian's chromium and chromium-driver (/usr/bin/chromium, "
           "/usr/bin/chromedriver): apt-get install chromium chromium-driver")

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.common.exceptions import NoSuchElementException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.remote.webdriver import WebDriver  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

PASSWORD = "correct horse battery staple"
PRODUCTION = {"repo": "acme/app", "environment": "production"}
DEADLINE = 45


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[WebDriver]:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--window-size=1280,1000",
                f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_window_size(1280, 1000)
    try:
        yield driver
    finally:
        driver.quit()  # ends chromium and chromedriver


def add_users(cluster: Cluster, *users: tuple[str, str]) -> dict[str, str]:
    """Users (name, role) with PASSWORD; their API tokens by name."""
    from orchestrator._identity import Users

    client = redis.Redis.from_url(cluster.redis_url)
    store = Users(client, cluster.settings.key_prefix, url=cluster.redis_url)
    tokens = {}
    for name, role in users:
        store.add(name, PASSWORD, role=role)
        tokens[name] = store.create_token(name)
    client.close()
    return tokens


def sign_in(driver: WebDriver, base: str, name: str) -> None:
    driver.get(f"{base}/login")
    driver.find_element(By.ID, "username").send_keys(name)
    driver.find_element(By.ID, "password").send_keys(PASSWORD)
    driver.find_element(By.ID, "sign-in").click()
    until(driver, lambda d: d.find_element(By.ID, "signed-in").text == name,
          f"{name} to be signed in")


def until(driver: WebDriver, condition: Any, what: str, timeout: float = DEADLINE) -> Any:
    """WebDriverWait that says what it waited for; missing elements count as not yet."""
    return WebDriverWait(driver, timeout, ignored_exceptions=(NoSuchElementException,)).until(
        condition, message=f"timed out after {timeout}s waiting for {what}")


def api(base: str, token: str) -> httpx.Client:
    return httpx.Client(base_url=f"{base}/api/v1", timeout=10,
                        headers={"Authorization": f"Bearer {token}"})


def status_of(client: httpx.Client, run_id: str) -> str:
    return str(client.get(f"/runs/{run_id}").json()["status"])


def start_waiting_run(client: httpx.Client) -> str:
    """A production BuildAndDeploy through the API, once it waits at its gate."""
    response = client.post("/runs", json={"workflow": "BuildAndDeploy", "input": PRODUCTION})
    assert response.status_code == 201, response.text
    run_id = str(response.json()["run_id"])
    wait_for(lambda: status_of(client, run_id) == "waiting", DEADLINE,
             what="the run to wait at its gate")
    return run_id


def present(driver: WebDriver, element_id: str) -> bool:
    return bool(driver.find_elements(By.ID, element_id))


def test_ops_lead_approves_from_the_inbox_and_the_page_updates_live(
        cluster: Cluster, browser: WebDriver, tmp_path: Path) -> None:
    tokens = add_users(cluster, ("ops-lead", "operator"))
    _, base = cluster.console()
    sign_in(browser, base, "ops-lead")

    # Start it from the form generated from the input schema.
    browser.get(f"{base}/workflows/BuildAndDeploy/start")
    browser.find_element(By.ID, "in-repo").send_keys("acme/app")
    browser.find_element(By.ID, "in-environment").clear()
    browser.find_element(By.ID, "in-environment").send_keys("production")
    browser.find_element(By.ID, "start-run").click()
    until(browser, lambda d: "/runs/" in d.current_url, "the new run's page")
    run_id = browser.current_url.rsplit("/", 1)[-1]
    # The page loaded while the run was building; it turns to waiting by itself.
    until(browser, lambda d: d.find_element(By.ID, "run-status").text == "waiting",
          "the run page to show the gate")

    browser.get(f"{base}/inbox")
    assert browser.find_element(By.ID, "inbox-count").text == "1"
    browser.find_element(By.LINK_TEXT, run_id).click()
    until(browser, lambda d: d.find_element(By.ID, "gate-prompt").is_displayed(), "the gate")
    assert "Release out.tar of acme/app to production?" in browser.find_element(
        By.ID, "gate-prompt").text

    # Anything injected now is gone if the page reloads.
    browser.execute_script("window.__kept = 'yes'; const m = document.createElement('div');"
                           "m.id = 'marker'; document.body.appendChild(m);")
    browser.find_element(By.ID, "comment").send_keys("ship it")
    browser.find_element(By.ID, "approve").click()
    until(browser, lambda d: d.find_element(By.ID, "run-status").text == "completed",
          "the run page to turn completed")
    assert browser.execute_script("return window.__kept") == "yes"
    until(browser, lambda d: not d.find_element(By.ID, "inbox-count").is_displayed(),
          "the inbox count to drop to nothing")
    assert present(browser, "marker"), "the page was reloaded"
    assert browser.find_element(By.CSS_SELECTOR, '[data-step="__end__"]').get_attribute(
        "data-mark") == "done"
    assert not present(browser, "approve")
    approved = browser.find_element(By.CSS_SELECTOR, '[data-event="gate_approved"]').text
    assert "ops-lead" in approved and "console" in approved and "ship it" in approved

    with api(base, tokens["ops-lead"]) as client:
        history = client.get(f"/runs/{run_id}/history").json()["history"]
    decision = next(e for e in history if e["event"] == "gate_approved")
    assert (decision["by"], decision["source"], decision["comment"]) == (
        "ops-lead", "console", "ship it")
    started = history[0]
    assert (started.get("by"), started.get("source")) == ("ops-lead", "console")

    # A viewport of 1280x1300 (the window is taller by the browser's own chrome).
    chrome = browser.execute_script("return window.outerHeight - window.innerHeight")
    browser.set_window_size(1280, 1300 + int(chrome))
    browser.execute_script("window.scrollTo(0, 0)")
    shot = Path(os.environ.get("ORCHESTRATOR_CONSOLE_SCREENSHOT") or tmp_path / "run.png")
    assert browser.save_screenshot(str(shot))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_viewer_sees_no_buttons_and_the_api_refuses_their_approval(
        cluster: Cluster, browser: WebDriver) -> None:
    tokens = add_users(cluster, ("ops-lead", "operator"), ("vera", "viewer"))
    _, base = cluster.console()
    with api(base, tokens["ops-lead"]) as client:
        run_id = start_waiting_run(client)

    sign_in(browser, base, "vera")
    browser.get(f"{base}/runs/{run_id}")
    until(browser, lambda d: d.find_element(By.ID, "gate-prompt").is_displayed(), "the gate")
    for button in ("approve", "reject", "stop", "pause", "resume", "comment"):
        assert not present(browser, button), f"a viewer was shown {button}"
    browser.get(f"{base}/workflows")
    assert not browser.find_elements(By.LINK_TEXT, "Start a run")
    browser.get(f"{base}/workflows/BuildAndDeploy/start")
    assert "Not allowed" in browser.find_element(By.TAG_NAME, "h1").text

    with api(base, tokens["vera"]) as client:
        response = client.post(f"/runs/{run_id}/approve", json={"comment": "me too"})
        assert response.status_code == 403, response.text
        assert status_of(client, run_id) == "waiting"


def test_a_form_post_without_its_csrf_token_is_refused(cluster: Cluster) -> None:
    tokens = add_users(cluster, ("ops-lead", "operator"))
    _, base = cluster.console()
    with api(base, tokens["ops-lead"]) as client:
        run_id = start_waiting_run(client)

    with httpx.Client(base_url=base, timeout=10) as web:
        assert web.get("/").headers["location"].startswith("/login")  # nobody signed in
        form = web.get("/login").text
        login_token = re.search(r'name="csrf" value="([^"]+)"', form)
        assert login_token is not None
        signed = web.post("/login", data={"username": "ops-lead", "password": PASSWORD,
                                          "csrf": login_token.group(1)})
        assert signed.status_code == 303 and "orchestrator_session" in web.cookies
        page = web.get(f"/runs/{run_id}").text
        token = re.search(r'name="csrf" value="([^"]+)"', page)
        assert token is not None and 'id="approve"' in page

        for data in ({"comment": "no token"}, {"comment": "bad", "csrf": "forged"}):
            refused = web.post(f"/runs/{run_id}/approve", data=data)
            assert refused.status_code == 403, refused.text
            assert "security token" in refused.text
        refused = web.post(f"/runs/{run_id}/stop", data={"confirm": "yes"})
        assert refused.status_code == 403
        with api(base, tokens["ops-lead"]) as client:
            assert status_of(client, run_id) == "waiting"
            assert not any(e["event"] == "gate_approved"
                           for e in client.get(f"/runs/{run_id}/history").json()["history"])

        # The same post with the session's token goes through: the token was the reason.
        accepted = web.post(f"/runs/{run_id}/approve",
                            data={"comment": "with token", "csrf": token.group(1)})
        assert accepted.status_code == 303, accepted.text
        with api(base, tokens["ops-lead"]) as client:
            wait_for(lambda: status_of(client, run_id) == "completed", DEADLINE,
                     what="the approved run to complete")
        # Deciding a gate that is gone is a readable 409, not an error trace.
        again = web.post(f"/runs/{run_id}/approve", data={"csrf": token.group(1)})
        assert again.status_code == 409 and "no gate waits" in again.text


def test_stop_asks_for_confirmation_and_the_page_follows(cluster: Cluster,
                                                          browser: WebDriver) -> None:
    tokens = add_users(cluster, ("ops-lead", "operator"))
    _, base = cluster.console()
    with api(base, tokens["ops-lead"]) as client:
        run_id = start_waiting_run(client)
    sign_in(browser, base, "ops-lead")
    browser.get(f"{base}/runs/{run_id}")
    stop = until(browser, lambda d: d.find_element(By.ID, "stop"), "the stop button")
    confirm = browser.find_element(By.ID, "confirm-stop")
    assert not browser.execute_script("return arguments[0].form.checkValidity()", confirm)
    stop.click()  # unconfirmed: the browser keeps the form to itself
    assert browser.find_element(By.ID, "run-status").text == "waiting"

    browser.find_element(By.CSS_SELECTOR, ".stop-form input[name=reason]").send_keys("wrong repo")
    confirm.click()
    browser.find_element(By.ID, "stop").click()
    until(browser, lambda d: d.find_element(By.ID, "run-status").text == "stopped",
          "the run page to show the run stopped")
    assert not present(browser, "stop") and not present(browser, "approve")
    with api(base, tokens["ops-lead"]) as client:
        history = client.get(f"/runs/{run_id}/history").json()["history"]
    stopped = next(e for e in history if e["event"] == "stopped")
    assert (stopped["by"], stopped["source"], stopped["reason"]) == (
        "ops-lead", "console", "wrong repo")


def test_a_trusted_proxy_user_gets_a_session_for_their_forms(cluster: Cluster) -> None:
    tokens = add_users(cluster, ("ops-lead", "operator"))
    _, base = cluster.console("--trust-header", "X-Forwarded-User",
                              "--trusted-proxy", "127.0.0.1")
    with api(base, tokens["ops-lead"]) as client:
        run_id = start_waiting_run(client)
    proxied = {"X-Forwarded-User": "ops-lead"}
    with httpx.Client(base_url=base, timeout=10, headers=proxied) as web:
        page = web.get(f"/runs/{run_id}")
        assert page.status_code == 200 and 'id="approve"' in page.text
        cookie = page.cookies.get("orchestrator_session")
        token = re.search(r'name="csrf" value="([^"]+)"', page.text)
        assert cookie and token
        assert "Secure" in page.headers["set-cookie"]  # behind a proxy: served over TLS
        # The proxy's header alone is not enough to post: the session's token is.
        assert web.post(f"/runs/{run_id}/approve", data={}).status_code == 403
        done = web.post(f"/runs/{run_id}/approve", data={"csrf": token.group(1)},
                        headers={"Cookie": f"orchestrator_session={cookie}"})
        assert done.status_code == 303, done.text
    with api(base, tokens["ops-lead"]) as client:
        wait_for(lambda: status_of(client, run_id) == "completed", DEADLINE,
                 what="the approved run to complete")


def test_without_users_the_console_is_read_only(cluster: Cluster, browser: WebDriver) -> None:
    from orchestrator import Client

    _, base = cluster.console()
    client = Client(settings=cluster.settings)
    try:
        handle = client.start("BuildAndDeploy", PRODUCTION)
        wait_for(lambda: handle.record().status.value == "waiting", DEADLINE,
                 what="the run to wait at its gate")
    finally:
        client.close()

    browser.get(f"{base}/")
    banner = browser.find_element(By.ID, "read-only-banner").text
    assert "read-only" in banner.lower()
    assert "orchestrator users add NAME --role operator" in banner
    assert browser.find_element(By.LINK_TEXT, handle.run_id)
    browser.get(f"{base}/runs/{handle.run_id}")
    until(browser, lambda d: d.find_element(By.ID, "gate-prompt").is_displayed(), "the gate")
    assert present(browser, "read-only-banner")
    assert not browser.find_elements(By.CSS_SELECTOR, "main button, main form")
    browser.get(f"{base}/workflows")
    assert not browser.find_elements(By.LINK_TEXT, "Start a run")


def test_the_start_form_shows_errors_beside_their_fields_and_starts_nothing(
        cluster: Cluster, browser: WebDriver) -> None:
    tokens = add_users(cluster, ("ops-lead", "operator"))
    _, base = cluster.console()

    browser.get(f"{base}/login")
    browser.find_element(By.ID, "username").send_keys("ops-lead")
    browser.find_element(By.ID, "password").send_keys("wrong")
    browser.find_element(By.ID, "sign-in").click()
    assert "Wrong name or password" in until(
        browser, lambda d: d.find_element(By.ID, "login-error").text, "the sign-in error")
    sign_in(browser, base, "ops-lead")

    browser.get(f"{base}/workflows/BuildAndDeploy/start")
    browser.find_element(By.ID, "in-environment").clear()
    browser.find_element(By.ID, "in-environment").send_keys("production <b>x</b>")
    browser.find_element(By.ID, "start-run").click()
    error = until(browser, lambda d: d.find_element(By.ID, "error-repo"), "the field error")
    assert "required" in error.text.lower()
    field = browser.find_element(By.ID, "field-repo")
    assert "has-error" in (field.get_attribute("class") or "")
    assert error in field.find_elements(By.CLASS_NAME, "field-error")
    # What was typed comes back as text in the field, not as markup.
    assert browser.find_element(By.ID, "in-environment").get_attribute(
        "value") == "production <b>x</b>"
    assert "/workflows/BuildAndDeploy/start" in browser.current_url

    with api(base, tokens["ops-lead"]) as client:
        listing = client.get("/runs", params={"workflow": "BuildAndDeploy"}).json()
    assert listing["runs"] == [] and sum(listing["counts"].values()) == 0
