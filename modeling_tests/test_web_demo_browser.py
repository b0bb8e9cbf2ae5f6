"""The web demo end to end in a real browser: Debian's Chromium driven by Playwright, against the app served here.

Never skipped: without Chromium (`apt-get install chromium`, done by `.ci/run`) or the `playwright` package (the
Python package only; `playwright install` is never needed) the test fails. Every wait is on page content.

    PIXELREFER_WRITE_SCREENSHOT=1 python -m pytest modeling_tests/test_web_demo_browser.py   # refreshes the README's
                                                                                              # docs/images/web_demo.png
"""

import os
import shutil
import socket
import tempfile
from pathlib import Path

import pytest

from pixelrefer_hf import web_demo

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
TIMEOUT_MS = 60_000
SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "images" / "web_demo.png"


@pytest.fixture(scope="module", autouse=True)
def patient_assertions():
    """`expect` waits for page content up to TIMEOUT_MS (its own default is 5 s, short on a busy 2-core machine)."""
    from playwright.sync_api import expect

    expect.set_options(timeout=TIMEOUT_MS)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    """The demo (bundled demo checkpoint, two requests at a time) served on a free local port for this module."""
    models = web_demo.DemoModels.load("demo")
    app = web_demo.build_app(models, concurrency_limit=2)
    port = free_port()
    web_demo.launch_app(app, host="127.0.0.1", port=port, block=False, quiet=True)
    yield f"http://127.0.0.1:{port}"
    app.close()


@pytest.fixture(scope="module")
def browser_context(server):
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"the browser test needs Chromium at {CHROMIUM}: apt-get install chromium (see .ci/run)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as error:
        pytest.fail(f"the browser test needs the playwright package: pip install -e '.[dev]' ({error})")
    external: list[str] = []

    def local_only(route) -> None:
        # The page must work without internet: anything it asks of another host is refused and recorded.
        url = route.request.url
        if url.startswith((server, "data:", "blob:")):
            route.continue_()
        else:
            external.append(url)
            route.abort()

    with sync_playwright() as playwright, tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        context = playwright.chromium.launch_persistent_context(
            profile,
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 1000},
        )
        context.set_default_timeout(TIMEOUT_MS)
        context.route("**/*", local_only)
        yield context, external
        context.close()


def open_page(context, server):
    page = context.new_page()
    page.goto(server)
    page.locator("#image-view img").wait_for()
    return page


def add_box(page, box: str, number: int) -> None:
    from playwright.sync_api import expect

    page.locator("#box-input input, #box-input textarea").first.fill(box)
    page.locator("#add-box").click()
    expect(page.locator("#image-regions")).to_contain_text(f"region {number}")


def ask(page, question: str) -> None:
    page.locator("#image-question textarea").fill(question)
    page.locator("#image-ask").click()


def test_box_question_error_and_recovery_in_the_browser(server, browser_context, tmp_path):
    from playwright.sync_api import expect

    context, external = browser_context
    page = open_page(context, server)
    expect(page.locator("#model-banner")).to_contain_text("toy model")
    add_box(page, "40,40,90,90", 1)
    answer, status = page.locator("#image-answer textarea"), page.locator("#image-status")

    ask(page, "What is <region>?")
    expect(answer).to_have_value("a red square")
    expect(status).to_contain_text("Answered in")
    screenshot = tmp_path / "web_demo.png"
    page.screenshot(path=str(screenshot), full_page=True)
    assert screenshot.read_bytes().startswith(b"\x89PNG") and screenshot.stat().st_size > 10_000
    if os.environ.get("PIXELREFER_WRITE_SCREENSHOT"):
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(screenshot, SCREENSHOT)

    # A bad request: its message in the page, no traceback, and the next good request is answered.
    ask(page, "What is <region> next to <region>?")
    expect(status).to_contain_text("the question has 2 <region> placeholder(s) but there are 1 region(s)")
    expect(answer).to_have_value("")
    assert "Traceback" not in page.content()
    ask(page, "What is <region>?")
    expect(answer).to_have_value("a red square")

    # An upload that is not an image is refused with its name; the picture and its region stay.
    bad = tmp_path / "notes.png"
    bad.write_text("this is not a picture")
    page.locator("#image-upload input[type=file], input[type=file]").first.set_input_files(str(bad))
    expect(status).to_contain_text("notes.png: cannot read image 'notes.png'")
    expect(page.locator("#image-regions")).to_contain_text("box 40,40,90,90")
    assert external == [], f"the page asked other hosts for {external}"
    page.close()


def test_two_sessions_at_once_keep_their_own_regions_and_answers(server, browser_context):
    from playwright.sync_api import expect

    context, _ = browser_context
    first, second = open_page(context, server), open_page(context, server)
    add_box(first, "40,40,90,90", 1)
    add_box(second, "140,30,184,74", 1)
    # Both questions are queued before either answer is read; the server answers two at a time.
    ask(first, "What is <region>?")
    ask(second, "What is <region>?")
    expect(first.locator("#image-answer textarea")).to_have_value("a red square")
    expect(second.locator("#image-answer textarea")).to_have_value("a yellow triangle")
    expect(first.locator("#image-regions")).not_to_contain_text("140,30,184,74")
    first.close()
    second.close()


def test_video_tab_in_the_browser(server, browser_context):
    from playwright.sync_api import expect

    context, external = browser_context
    page = open_page(context, server)
    page.get_by_role("tab", name="Video").click()
    page.locator("#video-ask").click()
    expect(page.locator("#video-status")).to_contain_text("upload a video (or load the example) first")
    page.locator("#video-example").click()
    expect(page.locator("#video-status")).to_contain_text("Example video loaded")
    page.locator("#video-box input, #video-box textarea").first.fill("134,88,154,108")
    page.locator("#video-add-box").click()
    expect(page.locator("#video-regions")).to_contain_text("frame 0: box 134,88,154,108")
    page.locator("#video-ask").click()
    expect(page.locator("#video-status")).to_contain_text("Answered in")
    answer = page.locator("#video-answer textarea").input_value()
    assert answer in {"up", "down", "left", "right"}, answer
    assert external == [], f"the page asked other hosts for {external}"
    page.close()
