"""A real browser for the UI tests: Debian's headless Chromium and its driver (never a download).

``chromium()`` yields a Selenium driver; without Chromium the test skips, except under ``CI=true``
(``.ci/run`` installs it), where it fails. ``log_in`` signs in on Airflow's simple auth manager page.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
BROWSER_FLAGS = (
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1400,1000",
)  # fmt: skip
IN_CI = os.environ.get("CI", "").lower() == "true"


@contextmanager
def chromium() -> Iterator:
    if not (Path(CHROMIUM).is_file() and Path(CHROMEDRIVER).is_file()):
        if IN_CI:
            pytest.fail(f"CI=true but {CHROMIUM} / {CHROMEDRIVER} are missing (.ci/run installs them)")
        pytest.skip("Debian's chromium and chromium-driver are not installed")
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for flag in BROWSER_FLAGS:
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.implicitly_wait(30)
    try:
        yield driver
    finally:
        driver.quit()


def log_in(browser, url: str, user: str, password: str, wait) -> None:
    """Open ``url``, sign in on the login page it redirects to, and wait until back at ``url``'s path."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions

    browser.get(url)
    wait.until(expected_conditions.url_contains("/auth/login"))
    browser.find_element(By.NAME, "username").send_keys(user)
    browser.find_element(By.NAME, "password").send_keys(password)
    next(b for b in browser.find_elements(By.TAG_NAME, "button") if b.text == "Sign in").click()
    wait.until(expected_conditions.url_contains(url.split("://", 1)[1].split("/", 1)[1]))


def open_trigger_form(browser, wait):
    """Click the DAG page's trigger button; returns the form's dialog and its submit button."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions

    wait.until(expected_conditions.element_to_be_clickable((By.CSS_SELECTOR, "[data-testid=trigger-dag-button]")))
    browser.find_element(By.CSS_SELECTOR, "[data-testid=trigger-dag-button]").click()
    submit = wait.until(
        expected_conditions.element_to_be_clickable((By.CSS_SELECTOR, "[data-testid=trigger-dag-submit]"))
    )
    form = next(d for d in browser.find_elements(By.CSS_SELECTOR, "[role=dialog]") if "Run Parameters" in d.text)
    wait.until(lambda _: "feature_cache" in form.text)
    return form, submit


def type_into(browser, field, value: str) -> None:
    """Replace a form field's text with ``value`` and check that it holds exactly that.

    The trigger form's inputs are React-controlled: under load a keystroke can be lost between
    re-renders (seen: "allowed" arrived as "allowd"). Typed again until the field holds ``value``
    (three tries), else the test fails here, naming the field, not later with a confusing run.
    """
    from selenium.webdriver.common.keys import Keys

    for _ in range(3):
        field.send_keys(Keys.CONTROL, "a")
        field.send_keys(Keys.DELETE)
        for char in value:  # one key at a time: each is rendered before the next
            field.send_keys(char)
        if field.get_attribute("value") == value:
            return
    raise AssertionError(f"{field.get_attribute('name')} holds {field.get_attribute('value')!r}, not {value!r}")


def follow_extra_link(browser, wait, task_page: str, name: str, shot: Path, why_missing) -> str:
    """Open a task's Details tab (``task_page`` + ``/details``, where Airflow lists its extra links), find
    the link ``name``, screenshot the tab to ``shot`` and open where the link points; returns that URL.
    A missing link fails the test with a screenshot (``<shot>-missing.png``), the page's text and
    ``why_missing()`` (e.g. the links as the REST API gives them)."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions

    browser.get(f"{task_page}/details")
    try:
        link = wait.until(expected_conditions.presence_of_element_located((By.LINK_TEXT, name)))
    except TimeoutException:
        browser.save_screenshot(str(shot.with_name(f"{shot.stem}-missing.png")))
        text = browser.find_element(By.TAG_NAME, "body").text[:1500]
        pytest.fail(f"no link {name!r} on {browser.current_url}: {why_missing()}\n{text}")
    browser.save_screenshot(str(shot))
    href = link.get_attribute("href")
    browser.get(href)
    return href
