"""A person at the real Label Studio page, in a real browser (Playwright driving Debian's Chromium): what the
browser tests share. `./dev.sh test` installs the browser where it can (root + apt); elsewhere those tests skip
and say why."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

import pytest


# Every step waits for the page's own event (an element shown, a response received) up to this long: a
# loaded machine makes each step slower, never a fixed delay too short.
LIMIT_MS = 300_000
# The annotation being edited holds a region: the backend's mask, accepted as a suggestion.
REGION_SHOWN = """() => {
  const store = window.Htx && window.Htx.annotationStore;
  const ann = store && store.selected;
  return !!ann && ann.regions.length > 0;
}"""


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
            # Open the task: the instructions are on the page, the image is shown
            page.goto(f"{ls_url}/projects/{project_id}/data?tab=0&task={task_id}")
            page.get_by_text("Auto-Annotation", exact=True).wait_for(timeout=LIMIT_MS)
            image = page.locator("img[src^=blob]")
            image.wait_for(state="visible", timeout=LIMIT_MS)
            if shots:
                page.screenshot(path=str(shots / "labelling-page.png"))
            page.get_by_text("Switch on Auto-Annotation", exact=False).first.wait_for(timeout=LIMIT_MS)
            # Auto-Annotation on, suggestions accepted as they come, the Auto-Detect point tool, label "positive"
            page.get_by_text("Auto-Annotation", exact=True).click()
            accept = page.get_by_text("Auto-Accept Suggestions", exact=True)
            accept.wait_for(state="visible", timeout=LIMIT_MS)
            accept.click()
            if shots:
                page.screenshot(path=str(shots / "auto-annotation-on.png"))
            smart = page.locator("div.lsf-toolbar__group > button.lsf-tool_smart")
            smart.wait_for(state="visible", timeout=LIMIT_MS)
            smart.hover()
            page.locator("button.lsf-tool_smart[aria-label=key-point-tool]").click()
            page.keyboard.press("1")
            # Click the object: the page asks Label Studio, which asks our backend; wait for that answer
            box = image.bounding_box()
            with page.expect_response(lambda r: "interactive-annotating" in r.url, timeout=LIMIT_MS) as answer:
                page.mouse.click(box["x"] + (x + 0.5) / w * box["width"], box["y"] + (y + 0.5) / h * box["height"])
            assert answer.value.ok and answered(), "the page never asked our ML backend"
            # Its mask arrives as a brush region (accepted as it comes): wait until the page holds it
            page.wait_for_function(REGION_SHOWN, timeout=LIMIT_MS)
            if shots:
                page.screenshot(path=str(shots / "model-mask.png"))
            with page.expect_response(lambda r: "/annotations" in r.url and r.request.method == "POST",
                                      timeout=LIMIT_MS) as saved:
                page.get_by_role("button", name="Submit").click()
            assert saved.value.ok, f"Label Studio refused the annotation: HTTP {saved.value.status}"
        finally:
            browser.close()
