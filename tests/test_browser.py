"""The web chat in headless Chromium (Debian's chromium driven by Playwright): enter the
API key, pick a persona, send a message, watch the answer stream in, reset."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from test_serve import REPO, USER, ServerThread, train_embedded_personas, train_tiny_personas

from personatune.engine import load_registry
from personatune.serve.app import create_app

CHROMIUM = Path("/usr/bin/chromium")
#: Flags for a hermetic headless run: no GPU, no sandbox (containers), no calls home.
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
OUTPUT = REPO / "test-output"

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="Debian's chromium is not installed (/usr/bin/chromium): apt-get install chromium",
)


def chat_in_browser(
    url: str,
    persona: str,
    message: str,
    screenshot: Path,
    api_key: str | None = None,
    max_tokens: int = 96,
) -> dict:
    """Drive the web chat at ``url``: enter ``api_key`` if asked, pick ``persona``, send
    ``message`` greedily, wait for the streamed answer, save ``screenshot``, then reset.

    Returns the description shown, the answer text, how many times the answer's text
    changed while streaming, the response's content type, and the bubbles left after reset.
    """
    playwright = pytest.importorskip("playwright.sync_api")
    seen = {}
    with playwright.sync_playwright() as p, tempfile.TemporaryDirectory() as profile:
        browser = p.chromium.launch_persistent_context(
            profile,
            executable_path=str(CHROMIUM),
            headless=True,
            args=FLAGS,
            viewport={"width": 1000, "height": 640},
        )
        try:
            page = browser.new_page()
            page.on(
                "response",
                lambda r: (
                    r.url.endswith("/v1/chat/completions")
                    and seen.setdefault("content_type", r.headers.get("content-type", ""))
                ),
            )
            page.goto(url)
            if api_key:
                page.wait_for_selector("#key-box:not([hidden])")
                page.fill("#api-key", api_key)
                page.click("#save-key")
            page.wait_for_selector(f"#persona option[value='{persona}']", state="attached")
            page.select_option("#persona", persona)
            page.fill("#temperature", "0")
            page.fill("#max-tokens", str(max_tokens))
            page.evaluate("""() => {
                window.__updates = 0;
                new MutationObserver(ms => { window.__updates += ms.filter(
                    m => m.target.closest && m.target.closest('.msg.assistant')).length; })
                  .observe(document.getElementById('log'),
                           {subtree: true, childList: true, characterData: true});
            }""")
            page.fill("#input", message)
            page.press("#input", "Enter")
            page.wait_for_selector(".msg.assistant[data-state='done']", timeout=120_000)
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(screenshot))
            seen.update(
                description=page.inner_text("#description"),
                answer=page.inner_text(".msg.assistant .text"),
                updates=page.evaluate("window.__updates"),
                notice=page.inner_text("#notice"),
            )
            page.click("#reset")
            seen["left_after_reset"] = page.locator(".msg").count()
        finally:
            browser.close()
    return seen


@pytest.fixture(
    scope="module", params=["tiny", pytest.param("embedded", marks=pytest.mark.integration)]
)
def personas(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"browser-{request.param}")
    if request.param == "tiny":
        return request.param, train_tiny_personas(root, request.getfixturevalue("tiny_model"))
    return request.param, train_embedded_personas(root)


def test_web_chat_streams_a_persona_answer(personas):
    """Guards against a web chat that cannot pick a persona, shows no description, does
    not stream, shows an answer other than the API's, or does not reset."""
    kind, dirs = personas
    registry = load_registry(dirs)
    second = list(registry.personas)[2]  # the second persona, not the default first one
    with ServerThread(create_app(registry, api_key="browser-key")) as server:
        shot = OUTPUT / f"web-chat-{kind}.png"
        seen = chat_in_browser(server.url, second, USER[0]["content"], shot, "browser-key")
        api = server.client("browser-key").chat.completions.create(
            model=second, messages=USER, temperature=0, max_tokens=96
        )
    assert seen["description"] == registry.personas[second].description
    assert seen["content_type"].startswith("text/event-stream")
    assert seen["answer"] == api.choices[0].message.content and seen["answer"]
    assert seen["updates"] > 1, "the answer appeared at once, not streamed"
    assert not seen["notice"]
    assert seen["left_after_reset"] == 0
    assert shot.stat().st_size > 10_000
