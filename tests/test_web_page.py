"""The web page at GET /, in a real headless browser (Debian's chromium and chromedriver: `make
browser`) against `tokenrm serve` processes with the shipped demo model. The colours the page
shows follow the rewards /score returns for the same item; hovering a token shows it; compare
mode shows both totals; server errors appear as a readable line; with API keys the page and its
files load without one, and it scores once the user enters the key, kept in the tab only."""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

from tokenrm import demo
from tokenrm.server.launcher import Running, serve

PROMPT = ("Facts: Sheizai is 49 years old. Sheizai lives in Porto. Sheizai works as a dentist. "
          "Sheizai has a cat. Question: Describe Sheizai for me.")
GARDENER = "Sheizai is 49 years old. Sheizai lives in Porto. Sheizai works as a gardener."
DENTIST = "Sheizai is 49 years old. Sheizai lives in Porto. Sheizai works as a dentist."
KEY = "k1"
WAIT_S = 30

# Every token element's data and the colour the browser computed for it, in one round trip.
TOKENS_JS = """
return [...arguments[0].querySelectorAll('.token')].map(e => ({
    index: e.dataset.index, reward: e.dataset.reward, id: e.dataset.tokenId,
    text: e.textContent, background: getComputedStyle(e).backgroundColor}));
"""


# ---------------------------------------------------------------- servers and the browser


@pytest.fixture(scope="module")
def server() -> Iterator[Running]:
    with serve(demo.checkpoint()) as running:
        yield running


@pytest.fixture(scope="module")
def keyed() -> Iterator[Running]:
    with serve(demo.checkpoint(), env={"TOKENRM_API_KEYS": KEY}) as running:
        yield running


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or driver is None:
        pytest.fail("chromium and chromedriver are not on PATH: run `make browser` (it installs "
                    "Debian's chromium and chromium-driver with apt-get)")
    options = Options()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1000"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    chrome = webdriver.Chrome(service=Service(driver), options=options)
    try:
        yield chrome
    finally:
        chrome.quit()


def console_errors(browser: webdriver.Chrome) -> list[str]:
    """The browser console's errors since the last call (reading the log empties it)."""
    return [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"]


def open_page(browser: webdriver.Chrome, url: str) -> None:
    browser.get(f"{url}/")
    browser.execute_script("sessionStorage.clear()")
    browser.refresh()
    WebDriverWait(browser, WAIT_S).until(
        lambda b: b.execute_script("return document.readyState") == "complete")
    assert browser.title.startswith("tokenrm")
    # page.js ran (it draws the legend) and page.css applies (the workspace is a grid).
    legend = browser.find_element(By.ID, "legend-bar").value_of_css_property("background-image")
    assert legend.startswith("linear-gradient"), legend
    assert browser.find_element(By.CSS_SELECTOR, ".workspace").value_of_css_property(
        "display") == "grid"


def score(browser: webdriver.Chrome, until: str = "scored") -> None:
    """Click Score and wait for the answer; the page's body says which state it is in."""
    browser.find_element(By.ID, "score").click()
    WebDriverWait(browser, WAIT_S).until(
        lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-state")
        in ("scored", "error"))
    state = browser.find_element(By.TAG_NAME, "body").get_attribute("data-state")
    assert state == until, (state, browser.find_element(By.ID, "status").text)


def scored(url: str, responses: list[str], key: str | None = None,
           prompt: str = PROMPT) -> dict[str, Any]:
    """What /score answers for the same items, asked directly."""
    headers = {"authorization": f"Bearer {key}"} if key else {}
    r = httpx.post(f"{url}/score", headers=headers, timeout=WAIT_S, json={
        "items": [{"prompt": prompt, "response": x} for x in responses], "return_tokens": True})
    r.raise_for_status()
    answer: dict[str, Any] = r.json()
    return answer


# ---------------------------------------------------------------- what the page shows


def rgb(css: str) -> tuple[int, int, int]:
    match = re.fullmatch(r"rgba?\((\d+), (\d+), (\d+)(, [\d.]+)?\)", css)
    assert match is not None, css
    assert match.group(4) in (None, ", 1"), f"a translucent background: {css}"
    r, g, b = (int(x) for x in match.groups()[:3])
    return r, g, b


def shown_number(text: str) -> float:
    return float(text.strip().replace("\u2212", "-"))


def check_colours(rewards: list[float], colours: list[tuple[int, int, int]]) -> None:
    """Red for negative, blue for positive, white at 0, deeper as |reward| grows."""
    for reward, (r, g, b) in zip(rewards, colours, strict=True):
        if reward <= -0.01:
            assert r > g and r > b, (reward, (r, g, b))
        elif reward >= 0.01:
            assert b > r and b >= g, (reward, (r, g, b))
    depth = [765 - sum(c) for c in colours]  # how far from white
    for sign in (-1, 1):
        ours = sorted((abs(x), d) for x, d in zip(rewards, depth, strict=True) if x * sign > 0)
        assert [d for _, d in ours] == sorted(d for _, d in ours), (sign, ours)
        if ours and ours[-1][0] - ours[0][0] > 0.5:  # rewards far apart: colours far apart
            assert ours[-1][1] > ours[0][1] + 200, (sign, ours)
    light = [d for x, d in zip(rewards, depth, strict=True) if abs(x) < 0.05]
    strong = [d for x, d in zip(rewards, depth, strict=True) if abs(x) > 0.5]
    assert light and strong and max(light) < 40 and min(strong) > 200, (light, strong)
    redness = [r - max(g, b) for r, g, b in colours]
    lowest = min(range(len(rewards)), key=rewards.__getitem__)
    assert redness[lowest] == max(redness)
    assert all(red < redness[lowest] for x, red in zip(rewards, redness, strict=True)
               if x > rewards[lowest] + 0.05)


def check_result(element: Any, result: dict[str, Any], response: str) -> None:
    """One response's tokens, colours, total and most negative tokens against /score's."""
    rewards = result["rewards"]
    tokens = element.parent.execute_script(TOKENS_JS, element)
    assert len(tokens) == len(rewards) == len(result["offsets"])
    assert [int(t["index"]) for t in tokens] == list(range(len(rewards)))
    assert [float(t["reward"]) for t in tokens] == rewards
    assert [int(t["id"]) for t in tokens] == result["token_ids"]
    # The user's own characters, cut by the offsets; the text between tokens kept.
    assert [t["text"] for t in tokens] == [response[a:b] for a, b in result["offsets"]]
    assert element.find_element(By.CSS_SELECTOR, ".tokens").get_attribute(
        "textContent") == response
    check_colours(rewards, [rgb(t["background"]) for t in tokens])
    total = element.find_element(By.CSS_SELECTOR, ".total")
    assert abs(shown_number(total.text) - result["total"]) <= 0.005 + 1e-9, total.text
    assert re.fullmatch(r"[\u2212+]?\d+\.\d\d", total.text), total.text
    assert float(total.get_attribute("data-total")) == result["total"]
    worst = sorted((x, i) for i, x in enumerate(rewards) if x < 0)[:5]
    listed = element.find_elements(By.CSS_SELECTOR, ".worst li")
    assert [int(li.get_attribute("data-index")) for li in listed] == [i for _, i in worst]
    for li, (x, i) in zip(listed, worst, strict=True):
        a, b = result["offsets"][i]
        assert li.find_element(By.TAG_NAME, "code").text == f'"{response[a:b]}"'
        assert abs(shown_number(li.find_element(By.CLASS_NAME, "reward").text) - x) <= 5e-4


# ---------------------------------------------------------------- the tests


def test_the_page_shows_each_token_coloured_by_its_reward(
        browser: webdriver.Chrome, server: Running, tmp_path: Path) -> None:
    open_page(browser, server.url)
    assert console_errors(browser) == []
    Select(browser.find_element(By.ID, "example")).select_by_value("gardener")
    assert browser.find_element(By.ID, "prompt").get_attribute("value") == PROMPT
    assert browser.find_element(By.ID, "response-a").get_attribute("value") == GARDENER
    assert not browser.find_element(By.ID, "response-b").is_displayed()
    score(browser)
    answer = scored(server.url, [GARDENER])
    [result] = answer["results"]
    [element] = browser.find_elements(By.CSS_SELECTOR, "#results .result")
    check_result(element, result, GARDENER)
    start = GARDENER.index("gardener")
    wrong = [i for i, (a, b) in enumerate(result["offsets"]) if a < start + 8 and b > start]
    assert len(wrong) == 4 and max(result["rewards"][i] for i in wrong) < -0.9
    assert browser.find_element(By.ID, "model-name").text == answer["model"]
    assert browser.find_element(By.ID, "model-version").text == answer["model_version"]

    # Hovering a token shows it in the details panel.
    i = wrong[1]
    token = element.find_element(By.CSS_SELECTOR, f'.token[data-index="{i}"]')
    assert not browser.find_element(By.ID, "details-body").is_displayed()
    ActionChains(browser).move_to_element(token).perform()
    WebDriverWait(browser, WAIT_S).until(
        lambda b: b.find_element(By.ID, "details-body").is_displayed())
    assert browser.find_element(By.ID, "detail-id").text == str(result["token_ids"][i])
    reward = shown_number(browser.find_element(By.ID, "detail-reward").text)
    assert abs(reward - result["rewards"][i]) <= 5e-4
    a, b = result["offsets"][i]
    assert browser.find_element(By.ID, "detail-offsets").text == f"[{a}, {b})"
    assert browser.find_element(By.ID, "detail-text").text == f'"{GARDENER[a:b]}"'

    shot = tmp_path / "scored.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    print(f"screenshot of the scored page: {shot}")
    assert console_errors(browser) == []


def test_compare_mode_scores_two_responses_side_by_side(
        browser: webdriver.Chrome, server: Running, tmp_path: Path) -> None:
    open_page(browser, server.url)
    Select(browser.find_element(By.ID, "example")).select_by_value("compare")
    assert browser.find_element(By.ID, "compare").is_selected()
    assert browser.find_element(By.ID, "response-b").get_attribute("value") == DENTIST
    score(browser)
    answer = scored(server.url, [GARDENER, DENTIST])
    elements = browser.find_elements(By.CSS_SELECTOR, "#results .result")
    assert len(elements) == 2
    for element, result, response in zip(elements, answer["results"], [GARDENER, DENTIST],
                                         strict=True):
        check_result(element, result, response)
    left, right = (e.location["x"] for e in elements)
    assert right > left + 200, "not side by side"
    assert answer["results"][0]["total"] < 0 < answer["results"][1]["total"]
    browser.save_screenshot(str(tmp_path / "compare.png"))
    print(f"screenshot of compare mode: {tmp_path / 'compare.png'}")
    assert console_errors(browser) == []


def test_the_page_shows_the_users_own_text(browser: webdriver.Chrome, server: Running) -> None:
    """Offsets count code points (an emoji is one, though JavaScript counts two); tokens may
    share a character (a byte-level tokenizer splits one into several) or have none."""
    prompt, response = "Facts: Ana lives in Lima.", "Ana 😀 lives\nin Köln  Łódź."
    open_page(browser, server.url)
    set_value = "document.getElementById(arguments[0]).value = arguments[1]"
    browser.execute_script(set_value, "prompt", prompt)
    browser.execute_script(set_value, "response-a", response)
    score(browser)
    [result] = scored(server.url, [response], prompt=prompt)["results"]
    assert len({tuple(o) for o in result["offsets"]}) < len(result["offsets"])  # some share
    element = browser.find_element(By.CSS_SELECTOR, "#results .result")
    assert element.find_element(By.CSS_SELECTOR, ".tokens").get_attribute(
        "textContent") == response
    tokens = browser.execute_script(TOKENS_JS, element)
    assert [float(t["reward"]) for t in tokens] == result["rewards"]
    for t, (a, b) in zip(tokens, result["offsets"], strict=True):
        assert t["text"] in (response[a:b], ""), (t, response[a:b])
    assert console_errors(browser) == []


def test_a_server_error_is_a_readable_line(browser: webdriver.Chrome, server: Running) -> None:
    open_page(browser, server.url)
    limit = httpx.get(f"{server.url}/v1/model").json()["limits"]["max_tokens_per_item"]
    browser.find_element(By.ID, "prompt").send_keys("Facts: Ana lives in Lima.")
    browser.execute_script("document.getElementById('response-a').value = arguments[0]",
                           "Ana lives in Lima. " * limit)
    score(browser, until="error")
    status = browser.find_element(By.ID, "status").text
    assert status.startswith("Error 422 (invalid_input, field response): "), status
    assert str(limit) in status, status
    assert browser.find_elements(By.CSS_SELECTOR, "#results .token") == []
    errors = console_errors(browser)  # the browser's own line about the failed request only
    assert len(errors) == 1 and "422" in errors[0], errors


def test_with_api_keys_the_page_loads_without_one_and_scores_with_it(
        browser: webdriver.Chrome, keyed: Running) -> None:
    assert httpx.post(f"{keyed.url}/score", json={"items": [{"prompt": "a", "response": "b"}]}
                      ).status_code == 401  # the server does want a key
    open_page(browser, keyed.url)  # the page, its script, style and icon: no key
    assert console_errors(browser) == []
    key = browser.find_element(By.ID, "api-key")
    assert key.get_attribute("value") == ""
    Select(browser.find_element(By.ID, "example")).select_by_value("gardener")

    score(browser, until="error")
    status = browser.find_element(By.ID, "status").text
    assert "needs an API key (401)" in status, status
    errors = console_errors(browser)
    assert len(errors) == 1 and "401" in errors[0], errors

    key.send_keys("not-the-key")
    score(browser, until="error")
    assert "refused this API key (401)" in browser.find_element(By.ID, "status").text
    errors = console_errors(browser)
    assert len(errors) == 1 and "401" in errors[0], errors

    key.clear()
    key.send_keys(KEY)
    score(browser)
    [result] = scored(keyed.url, [GARDENER], key=KEY)["results"]
    check_result(browser.find_element(By.CSS_SELECTOR, "#results .result"), result, GARDENER)
    assert KEY not in browser.current_url
    assert browser.execute_script("return sessionStorage.getItem('tokenrm.apiKey')") == KEY
    assert browser.execute_script("return localStorage.length") == 0

    browser.refresh()  # the key stays with the tab
    WebDriverWait(browser, WAIT_S).until(
        lambda b: b.find_element(By.ID, "api-key").get_attribute("value") == KEY)
    Select(browser.find_element(By.ID, "example")).select_by_value("dentist")
    score(browser)
    assert console_errors(browser) == []
    browser.find_element(By.ID, "forget-key").click()
    assert browser.execute_script("return sessionStorage.getItem('tokenrm.apiKey')") is None
