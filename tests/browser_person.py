"""A person at the real Label Studio page, in a real browser (Playwright driving Debian's Chromium): what the
browser tests share. `./dev.sh test` installs the browser where it can (root + apt); elsewhere those tests skip
and say why."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

import pytest


def find_browser() -> str:
    """The Chromium executable, or skip the test with the reason."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.skip("playwright is not installed (pip install playwright; ./dev.sh test installs it)")
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("no Chromium on this machine (./dev.sh test installs Debian's chromium when run as root with apt)")


def click_object_and_submit(executable: str, ls_url: str, username: str, password: str, project_id: int,
                            task_id: int, click_xy: tuple[int, int], size_hw: tuple[int, int],
                            answered: Callable[[], bool], shots: Path | None = None) -> None:
    """Log in as a person does, open the task, switch on Auto-Annotation (suggestions accepted as they come),
    pick the Auto-Detect point tool with label "positive", click pixel `click_xy` (x, y of an image of
    `size_hw`), wait until `answered()` says the ML backend answered, and submit. shots: a folder for the
    screenshots docs/people.md shows (labelling-page, auto-annotation-on, model-mask)."""
    from playwright.sync_api import sync_playwright

    (x, y), (h, w) = click_xy, size_hw
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            # Log in
            page.goto(f"{ls_url}/user/login/")
            page.fill("input[name=email]", username)
            page.fill("input[name=password]", password)
            page.click("button[type=submit], input[type=submit]")
            page.wait_for_load_state("networkidle")
            # Open the task: the instructions are on the page
            page.goto(f"{ls_url}/projects/{project_id}/data?tab=0&task={task_id}")
            page.get_by_text("Auto-Annotation", exact=True).wait_for(timeout=60_000)
            page.wait_for_timeout(1500)
            if shots:
                page.screenshot(path=str(shots / "labelling-page.png"))
            page.get_by_text("Switch on Auto-Annotation", exact=False).first.wait_for(timeout=30_000)
            # Auto-Annotation on, suggestions accepted as they come, the Auto-Detect point tool, label "positive"
            page.get_by_text("Auto-Annotation", exact=True).click()
            page.get_by_text("Auto-Accept Suggestions", exact=True).click()
            page.wait_for_timeout(500)
            if shots:
                page.screenshot(path=str(shots / "auto-annotation-on.png"))
            page.locator("div.lsf-toolbar__group > button.lsf-tool_smart").hover()
            page.locator("button.lsf-tool_smart[aria-label=key-point-tool]").click()
            page.keyboard.press("1")
            # Click the object
            box = page.locator("img[src^=blob]").bounding_box()
            page.mouse.click(box["x"] + (x + 0.5) / w * box["width"], box["y"] + (y + 0.5) / h * box["height"])
            # The page asks our backend; its mask arrives as a brush region
            for _ in range(120):
                if answered():
                    break
                page.wait_for_timeout(500)
            assert answered(), "the page never asked our ML backend"
            page.wait_for_timeout(2000)
            if shots:
                page.screenshot(path=str(shots / "model-mask.png"))
            page.get_by_role("button", name="Submit").click()
            page.wait_for_timeout(2000)
        finally:
            browser.close()
