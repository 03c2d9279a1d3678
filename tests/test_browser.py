"""The shop page in headless Chromium against the real retriever + Triton (Playwright drives it)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("Debian's chromium is not installed (`make tools` installs it when run as root)")
    playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the [test] extra")
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


def test_shop_page_shows_recommendations_and_search_results(browser, retriever, tmp_path: Path) -> None:
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    failed: list[str] = []
    page.on("requestfailed", lambda request: failed.append(request.url))
    page.goto(f"{retriever.url}/shop/")
    page.wait_for_function("document.querySelectorAll('#customer option').length > 1")
    assert "known customers" in page.inner_text("#status")

    # Pick a customer, get recommendations as cards with name, type/colour, description and score.
    page.select_option("#customer", index=1)
    page.click("#recommend")
    page.wait_for_selector(".card")
    assert page.locator(".card").count() == 12
    first = page.locator(".card").first
    assert first.locator("h3").inner_text() and "·" in first.locator(".type").inner_text()
    assert float(first.locator(".score").inner_text()) > 0
    assert "items for customer" in page.inner_text("#status")

    # Text search, with a product-group filter, then "more like this" by clicking a card.
    page.select_option("#product-group", index=1)
    group = page.eval_on_selector("#product-group", "e => e.value")
    page.fill("#query", "black jersey dress")
    page.press("#query", "Enter")
    page.wait_for_function("document.getElementById('status').textContent.includes('items for \"black jersey dress\"')")
    cards = page.locator(".card")
    assert cards.count() >= 1
    clicked = cards.first.get_attribute("data-article-id")
    cards.first.click()
    # "loading more like ..." shows first, with the previous cards still up: wait for the result line.
    page.wait_for_function("document.getElementById('status').textContent.includes('items for more like')")
    ids = page.eval_on_selector_all(".card", "cards => cards.map(c => c.dataset.articleId)")
    assert ids and clicked not in ids
    groups = page.eval_on_selector_all(".card", "cards => cards.map(c => c.dataset.productGroup)")
    assert groups and set(groups) == {group}  # the page's product-group filter reached the API

    # An error is shown, not swallowed.
    page.fill("#query", "")
    page.click("#search")
    assert "type something" in page.inner_text("#status")
    page.screenshot(path=str(tmp_path / "shop.png"), full_page=True)
    assert (tmp_path / "shop.png").stat().st_size > 10_000
    assert not failed, failed
