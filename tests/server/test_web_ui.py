"""The server's web UI in a real browser (headless Chromium through chromedriver): log in with an
admin token, see the repositories and who holds a lock, revoke a token."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import urllib3

from tests.conftest import requires
from tests.server.helpers import ServerProcess, alice_with_a_point

WAIT_S = 20


@pytest.fixture
def browser() -> Iterator[object]:
    requires("chromium", "chromedriver")
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = str(shutil.which("chromium"))
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=str(shutil.which("chromedriver"))))
    driver.implicitly_wait(WAIT_S)
    try:
        yield driver
    finally:
        driver.quit()


def log_in(driver, url: str, token: str) -> None:  # type: ignore[no-untyped-def]
    from selenium.webdriver.common.by import By

    driver.get(url + "/ui/")
    assert driver.current_url.endswith("/ui/login")  # no session: sent to the login page
    field = driver.find_element(By.ID, "token")
    field.clear()
    field.send_keys(token)
    driver.find_element(By.ID, "login").click()


def test_an_admin_sees_repositories_and_revokes_a_token(browser, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from selenium.webdriver.common.by import By

    server = ServerProcess(tmp_path / "srv")
    try:
        full, _ = alice_with_a_point(server, tmp_path)
        bob = server.token("bob", append_only=True)
        bob_id = bob.split("_")[1]
        admin = server.admin_token()
        lock = json.dumps({"exclusive": False, "host": "web1<script>", "pid": 4242, "refreshed": time.time()})
        answer = server.request("PUT", "/v1/repos/alice/objects/locks/" + "cd" * 16, full, body=lock.encode())
        assert answer.status == 201

        log_in(browser, server.url, "umbra_0000000000000000_" + "A" * 43)
        assert "not an admin token" in browser.find_element(By.ID, "error").text
        log_in(browser, server.url, bob)  # a client's token is not an admin's
        assert "not an admin token" in browser.find_element(By.ID, "error").text

        log_in(browser, server.url, admin)
        row = browser.find_element(By.ID, "repo-alice")
        assert row.find_element(By.CLASS_NAME, "points").text == "1"
        assert "backup by web1<script> pid 4242" in row.text  # shown as text, never run
        assert browser.find_element(By.ID, f"token-{bob_id}").text.split()[1:3] == ["bob", "append"]
        cookie = next(c for c in browser.get_cookies() if c["name"] == "umbra_session")
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"

        # a form without the session's CSRF value is refused, even with the session cookie
        forged = urllib3.PoolManager().request(
            "POST", f"{server.url}/ui/tokens/{bob_id}/revoke", headers={"Cookie": f"umbra_session={cookie['value']}"}
        )
        assert forged.status == 403
        assert server.request("GET", "/v1/repos/bob", bob).status == 200

        browser.find_element(By.ID, f"revoke-{bob_id}").click()
        browser.implicitly_wait(0)
        deadline = time.monotonic() + WAIT_S
        while browser.find_elements(By.ID, f"token-{bob_id}") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not browser.find_elements(By.ID, f"token-{bob_id}")
        assert server.request("GET", "/v1/repos/bob", bob).status == 401  # revoked for the API too

        page = urllib3.PoolManager().request("GET", f"{server.url}/ui/login")
        assert "default-src 'none'" in page.headers["Content-Security-Policy"]
        stats = server.request("GET", "/v1/admin/repos", admin).json()["repos"]
        assert [(r["name"], r["points"]) for r in stats if r["exists"]] == [("alice", 1)]
        assert server.request("GET", "/v1/admin/repos", full).status == 404  # not for clients
        assert server.request("GET", "/v1/repos/alice", admin).status == 404  # admins open no repository
    finally:
        server.stop()
