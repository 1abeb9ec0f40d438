"""The chat page in a real browser (headless Chromium from Debian, driven by Playwright) against ``gallama run`` on
the embedded SmolLM2-135M, with an inference key configured: the page must carry it.

One server and one browser for the module; each test gets a fresh browser context (empty localStorage). A
screenshot of each state is saved under tests/artifacts/webui/ (gitignored).
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gallama_kernel.testing import RunningServer

playwright_api = pytest.importorskip("playwright.sync_api", reason="the test extra installs playwright")

BROWSER = os.environ.get("GALLAMA_TEST_BROWSER", "/usr/bin/chromium")
KEY = "webui-test-key"
MODEL = "smollm2"
SCREENSHOTS = Path(__file__).parent / "artifacts" / "webui"
ARTIFACT_PROMPT = "Explain in one liner what quicksort is and write me quicksort in python and Java"
PAYLOAD = '<script>window.__pwned=1</script><img src=x onerror="window.__pwned=2">'


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    running = RunningServer(tmp_path_factory.mktemp("webui-home"),
                            env={"GALLAMA_API_KEYS": KEY, "GALLAMA_THINKING_MAX_TOKENS": "48"})
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not os.access(BROWSER, os.X_OK):
        pytest.fail(f"no browser at {BROWSER}: run `make install-test` (tests/install_browser.sh installs Debian's "
                    "chromium) or set GALLAMA_TEST_BROWSER")
    with playwright_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=BROWSER)
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture()
def page(browser: Any, server: RunningServer) -> Iterator[Any]:
    context = browser.new_context(base_url=server.base_url, viewport={"width": 1280, "height": 800})
    context.set_default_timeout(30_000)
    opened = context.new_page()
    problems: list[str] = []
    opened.on("pageerror", lambda error: problems.append(str(error)))
    # console errors of the page's own code; refused requests (tests of errors) and the sandbox blocking an
    # artifact's scripts (what the sandbox is for) are logged too, and expected
    expected = ("Failed to load resource", "Blocked script execution in 'about:srcdoc'")
    opened.on("console", lambda message: problems.append(message.text)
              if message.type == "error" and not message.text.startswith(expected) else None)
    opened.problems = problems
    try:
        yield opened
    finally:
        context.close()


def shot(page: Any, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    print(f"screenshot: {path}")


def open_page(page: Any, key: str | None = KEY, **settings: Any) -> None:
    """Load the page and set the key and other settings through the settings panel; the model list is loaded."""
    page.goto("/")  # redirects to /ui
    assert page.url.endswith("/ui")
    page.wait_for_function("() => document.body.dataset.ready === 'true'")
    page.click("#settings summary")
    fields = {"#api-key": key, "#max-tokens": settings.get("max_tokens"), "#temperature": settings.get("temperature")}
    for selector, value in fields.items():
        if value is not None:
            page.fill(selector, str(value))
            page.dispatch_event(selector, "change")
    page.click("#settings summary")
    if key == KEY:
        page.wait_for_function(f"() => document.querySelector('#model').value === {json.dumps(MODEL)}")


def send(page: Any, text: str) -> None:
    """Type ``text`` and press Enter; returns once the answer's message is on the page (it may have ended already)."""
    before = page.locator(".message.role-assistant").count()
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")
    page.wait_for_function(f"() => document.querySelectorAll('.message.role-assistant').length > {before}")


def wait_idle(page: Any, timeout: float = 120) -> None:
    page.wait_for_function("() => document.body.dataset.busy === 'false'", timeout=timeout * 1000)


def answer_text(page: Any) -> str:
    return page.locator(".message.role-assistant .content").last.inner_text()


def health_busy(server: RunningServer) -> int:
    return server.health()["models"][MODEL].get("busy", 0)


def test_chat_streams_and_survives_a_reload(page: Any) -> None:
    open_page(page, max_tokens=48, temperature=0)
    # every change of the answer's text, as the page renders it
    page.evaluate("""() => {
        window.__lengths = [];
        new MutationObserver(() => {
            const answers = document.querySelectorAll('.message.role-assistant .content');
            if (answers.length) window.__lengths.push(answers[answers.length - 1].textContent.length);
        }).observe(document.getElementById('messages'), {childList: true, subtree: true, characterData: true});
    }""")
    send(page, "Tell me about llamas.")
    wait_idle(page)
    lengths = page.evaluate("() => window.__lengths")
    final = answer_text(page)
    assert final.strip()
    growing = sorted({n for n in lengths if 0 < n < len(final)})
    assert len(growing) >= 2, f"the text appeared at once, not streamed: {lengths}"
    assert re.search(r"\d+ prompt tokens, \d+ completion tokens", page.inner_text("#usage"))
    assert page.locator("#error").is_hidden()
    shot(page, "1-streamed-answer")

    page.reload()
    page.wait_for_function("() => document.body.dataset.ready === 'true'")
    assert page.locator(".message.role-user .content").first.inner_text() == "Tell me about llamas."
    assert answer_text(page) == final
    assert page.locator("#chats .chat.current").inner_text() == "Tell me about llamas."
    assert page.input_value("#api-key") == KEY  # kept in localStorage
    shot(page, "2-after-reload")

    page.click("#new-chat")
    assert page.locator(".message").count() == 0
    assert page.locator("#chats .chat").count() == 2
    assert not page.problems, page.problems


def test_stop_ends_the_generation_on_the_server(page: Any, server: RunningServer) -> None:
    open_page(page, max_tokens=4000, temperature=0)
    send(page, "Write a very long story about a dragon who learns to paint, with many chapters.")
    page.wait_for_function("() => { const a = document.querySelectorAll('.message.role-assistant .content');"
                           " return a.length && a[a.length - 1].textContent.length > 40; }")
    assert health_busy(server) == 1, server.health()  # generating (4000 tokens would take a while)
    page.click("#stop")
    wait_idle(page, 10)
    stopped = answer_text(page)
    assert page.locator(".message.role-assistant .note").inner_text() == "Stopped."
    deadline = time.monotonic() + 15
    while health_busy(server) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert health_busy(server) == 0, server.health()
    time.sleep(1)
    assert answer_text(page) == stopped, "the text kept growing after stop"
    assert page.locator("#send").is_visible() and page.locator("#stop").is_hidden()
    shot(page, "3-stopped")
    assert not page.problems, page.problems


def test_artifacts_are_shown_beside_the_answer(page: Any) -> None:
    open_page(page, max_tokens=300, temperature=0)
    page.check("#artifact")
    send(page, ARTIFACT_PROMPT)
    wait_idle(page, 180)
    assert page.locator("#error").is_hidden(), page.inner_text("#error")
    panel = page.locator("#artifacts")
    assert panel.is_visible()
    cards = panel.locator(".artifact")
    assert cards.count() >= 1
    first = cards.first
    assert first.locator(".title").inner_text().strip()
    assert len(first.locator("pre.code").inner_text()) > 10
    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    first.locator(".copy").click()
    playwright_api.expect(first.locator(".copy")).to_have_text("Copied")
    assert page.evaluate("() => navigator.clipboard.readText()") == first.locator("pre.code").inner_text()
    assert page.locator(".message.role-assistant .artifact-chip").count() == cards.count()
    assert page.locator(".message.role-assistant .content p").count() >= 1  # the prose, beside
    if page.locator("#artifacts .tok-keyword").count() == 0:
        print("no keyword highlighted in", first.locator("pre.code").inner_text()[:200])
    shot(page, "4-artifacts")

    page.reload()
    page.wait_for_function("() => document.body.dataset.ready === 'true'")
    assert page.locator("#artifacts .artifact").count() == cards.count()
    assert page.is_checked("#artifact")
    assert not page.problems, page.problems


def test_thinking_is_shown_folded(page: Any) -> None:
    open_page(page, max_tokens=24, temperature=0)
    page.click("#settings summary")
    page.fill("#thinking-template", "<thinking><problem>{problem}</problem><answer>{answer}</answer></thinking>")
    page.dispatch_event("#thinking-template", "change")
    page.click("#settings summary")
    send(page, "How many legs does a llama have?")
    wait_idle(page)
    assert page.locator("#error").is_hidden(), page.inner_text("#error")
    reasoning = page.locator(".message.role-assistant details.reasoning")
    assert reasoning.count() == 1 and reasoning.get_attribute("open") is None
    assert "<thinking>" not in answer_text(page)
    reasoning.locator("summary").click()
    assert reasoning.locator("pre").inner_text().startswith("<thinking>")
    shot(page, "9-thinking")
    assert not page.problems, page.problems


STORED = {
    "current": "hostile",
    "chats": [{"id": "hostile", "title": "hostile", "messages": [
        {"role": "user", "content": f"user says {PAYLOAD} and [click](javascript:window.__pwned=3)"},
        {"role": "assistant", "content": "", "reasoning_content": f"thinking {PAYLOAD}",
         "segments": [
             {"meta": {"tag_type": "text"}, "content": f"# Title {PAYLOAD}\n\n**bold** `{PAYLOAD}`\n\n"
                                                       "- [ok](https://example.com/a)\n- [bad](javascript:alert(1))"},
             {"meta": {"tag_type": "artifact", "artifact_type": "code", "identifier": "page", "title": "A page",
                       "language": "html"},
              "content": f"<style>h1 {{ color: rgb(200, 0, 0); }}</style>"
                         f"<h1>Preview</h1><svg width='40' height='40'><circle cx='20' cy='20' r='15'/></svg>"
                         f"<script>parent.__pwned=4</script><img src=x onerror=\"parent.__pwned=5\">{PAYLOAD}"},
         ],
         "tool_calls": [{"id": "call_1", "type": "function",
                         "function": {"name": "get_weather", "arguments": json.dumps({"city": PAYLOAD})}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": json.dumps({"result": PAYLOAD})},
    ]}],
}


def test_model_output_cannot_inject_script(page: Any) -> None:
    """Markup from the model stays text: a stored conversation (reloaded) and a live answer forced by a regex."""
    page.goto("/ui")
    page.evaluate("stored => localStorage.setItem('gallama.chats', JSON.stringify(stored))", STORED)
    open_page(page, max_tokens=120, temperature=0)
    messages = page.locator("#messages")
    assert "<script>window.__pwned=1</script>" in messages.inner_text()
    assert messages.locator("img, script, iframe").count() == 0
    links = messages.locator("a")
    assert links.count() == 1 and links.first.get_attribute("href") == "https://example.com/a"
    assert page.locator("details.reasoning").count() == 1 and not page.locator("details.reasoning").get_attribute(
        "open")
    assert "get_weather" in page.locator(".tool-call").inner_text()
    assert page.locator(".message.role-tool").count() == 1
    page.click("#artifacts .artifact .preview")
    frame = page.locator("#artifacts iframe")
    assert frame.get_attribute("sandbox") == ""
    page.wait_for_timeout(500)
    assert page.frames[1].locator("h1").inner_text() == "Preview"  # rendered, without scripts
    heading_color = page.frames[1].locator("h1").evaluate("h => getComputedStyle(h).color")
    assert heading_color == "rgb(200, 0, 0)"  # with the artifact's own <style>
    shot(page, "5-hostile-stored")

    # a live answer that is exactly the payload: the request is amended with gallama's regex_pattern field
    def amend(route: Any) -> None:
        body = json.loads(route.request.post_data)
        body["regex_pattern"] = re.escape(PAYLOAD).replace("\\ ", " ")
        body["messages"] = body["messages"][-1:]
        route.continue_(post_data=json.dumps(body))

    page.route("**/v1/chat/completions", amend)
    send(page, "Say hello.")
    wait_idle(page)
    assert answer_text(page) == PAYLOAD
    page.wait_for_timeout(500)
    assert page.evaluate("() => typeof window.__pwned") == "undefined"
    assert page.locator("#messages img, #messages script").count() == 0
    shot(page, "6-hostile-live")
    assert not page.problems, page.problems


def test_errors_are_shown(page: Any) -> None:
    open_page(page)
    page.click("#settings summary")
    page.fill("#api-key", "wrong-key")
    page.dispatch_event("#api-key", "change")
    page.wait_for_function("() => !document.getElementById('error').hidden")
    assert "A valid API key is required" in page.inner_text("#error")
    send(page, "Hello?")
    wait_idle(page)
    assert "A valid API key is required" in page.inner_text("#error")
    assert "A valid API key is required" in page.locator(".message.role-assistant .message-error").inner_text()
    shot(page, "7-error-bad-key")

    page.fill("#api-key", KEY)
    page.dispatch_event("#api-key", "change")
    page.fill("#max-tokens", "1000000")
    page.dispatch_event("#max-tokens", "change")
    page.click("#settings summary")
    send(page, "Hello again?")
    wait_idle(page)
    refused = page.inner_text("#error")
    assert "1000000" in refused, refused  # the server's 400 names the requested max_tokens
    shot(page, "8-error-refused")
