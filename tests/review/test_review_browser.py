"""The review page in a real headless Chromium (Debian's chromium + chromedriver, via Selenium):
log in, rate with the keyboard, stop and restart the server, resume, then report.

Chromium comes from `tools/setup_browser.sh` (run by tools/run_tests.sh); without it the test
skips and says so. REVIEW_SCREENSHOT=path saves a screenshot of the page (docs/review.png).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys

import pytest

from tests.conftest import REPO

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="chromium/chromedriver not installed: run `bash tools/setup_browser.sh` as root "
           "(Debian packages chromium chromium-driver)")

# The reviewer's taste: x > y > z. Item i4 is a tie and i5 a skip whatever the order.
PREFER = ["x", "y", "z"]
ITEMS = [("x", "y"), ("y", "x"), ("x", "z"), ("y", "z"), ("x", "y"), ("z", "y"), ("x", "y"),
         ("z", "x")]


def _start_server(db, samples):
    proc = subprocess.Popen(
        [sys.executable, "-m", "tools.review", "serve", "--db", db, "--samples", samples,
         "--port", "0"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env={**os.environ, "PYTHONPATH": REPO})
    for line in proc.stdout:
        m = re.search(r"open (http://127\.0\.0\.1:\d+/)", line)
        if m:
            return proc, m.group(1)
    raise AssertionError(f"review serve exited {proc.wait()} without serving")


def _stop(proc):
    proc.terminate()  # like Ctrl-C / a crash: nothing is flushed at exit beyond what is committed
    proc.wait(timeout=10)


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1280,800"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(30)
    driver.implicitly_wait(10)  # elements the page's script adds may lag on a loaded machine
    yield driver
    driver.quit()


def _rate(driver, key_for_item):
    """Press the key for the item on the page; returns (item id, left system, key)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    item_id = driver.find_element(By.ID, "item-id").text
    left = driver.find_element(By.NAME, "left").get_attribute("value")
    key = key_for_item(item_id, left)
    driver.find_element(By.TAG_NAME, "body").send_keys(key)
    WebDriverWait(driver, 10).until(
        lambda d: not d.find_elements(By.ID, "item-id") or
        d.find_element(By.ID, "item-id").text != item_id)
    return item_id, left, key


def test_rate_in_chromium_resume_and_report(tmp_path, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    samples = tmp_path / "samples.jsonl"
    samples.write_text("".join(json.dumps({
        "id": f"i{k}", "prompt": f"def f{k}(x):\n    return", "system_a": a,
        "output_a": f" x + {k}  # from {a}", "system_b": b, "output_b": f" x * {k}  # from {b}"})
        + "\n" for k, (a, b) in enumerate(ITEMS)))
    db = str(tmp_path / "ratings.sqlite")

    def key_for(item_id, left):
        k = int(item_id[1:])
        if k == 4:
            return "t"
        if k == 5:
            return "s"
        a, b = ITEMS[k]
        best = min(a, b, key=PREFER.index)
        return (Keys.ARROW_LEFT if k % 2 else "a") if best == left else "b"

    proc, url = _start_server(db, str(samples))
    try:
        browser.get(url)
        box = browser.find_element(By.ID, "reviewer")
        box.send_keys("alice", Keys.ENTER)  # the name form, by keyboard
        assert browser.find_element(By.ID, "who").text == "alice"
        assert browser.find_element(By.ID, "progress").text == "0 / 8"
        if os.environ.get("REVIEW_SCREENSHOT"):
            browser.save_screenshot(os.environ["REVIEW_SCREENSHOT"])
        done = [_rate(browser, key_for) for _ in range(5)]
    finally:
        _stop(proc)

    # Stop and restart: the five ratings are in SQLite and alice resumes at the sixth item.
    proc, url = _start_server(db, str(samples))
    try:
        browser.get(url + "?reviewer=alice")
        assert browser.find_element(By.ID, "progress").text == "5 / 8"
        assert browser.find_element(By.ID, "item-id").text == "i5"
        done += [_rate(browser, key_for) for _ in range(3)]
        assert "All 8 items rated" in browser.find_element(By.TAG_NAME, "h2").text
        browser.get(url + "?reviewer=bob")  # a second reviewer starts from the beginning
        assert browser.find_element(By.ID, "item-id").text == "i0"
        done_bob = [_rate(browser, lambda i, left: "b") for _ in range(2)]
    finally:
        _stop(proc)

    conn = sqlite3.connect(db)
    rows = {(r[0], r[1]): r[2:] for r in conn.execute(
        "SELECT item_id, reviewer, left_system, right_system, choice, winner FROM ratings")}
    assert len(rows) == 10
    lefts = []
    for (item_id, reviewer), (left, right, choice, winner) in rows.items():
        a, b = ITEMS[int(item_id[1:])]
        assert {left, right} == {a, b}
        lefts.append(left == a)
        if reviewer == "alice":
            k = int(item_id[1:])
            expected = {4: ("tie", None), 5: ("skip", None)}.get(k, (
                "A" if min(a, b, key=PREFER.index) == left else "B", min(a, b, key=PREFER.index)))
            assert (choice, winner) == expected, item_id
        else:
            assert (choice, winner) == ("B", right)
    assert 0 < sum(lefts) < len(lefts)  # both orders were shown
    assert [d[0] for d in done] == [f"i{k}" for k in range(8)]
    assert [d[0] for d in done_bob] == ["i0", "i1"]

    out = tmp_path / "report"
    subprocess.run([sys.executable, "-m", "tools.review", "report", "--db", db, "--out", str(out),
                    "--bootstrap", "200"], cwd=REPO, check=True, capture_output=True,
                   env={**os.environ, "PYTHONPATH": REPO})
    rep = json.loads((out / "review.json").read_text())
    # Hand count of the decisive and tied ratings (skip left out): x-y games: alice i0, i1, i4
    # (tie), i6 -> x 3.5 of 4, plus bob's i0 and i1 (whatever the right side was).
    bob_xy = sum(rows[(f"i{k}", "bob")][3] == "x" for k in (0, 1))
    assert rep["games"]["x"]["y"] == 6
    assert rep["win_rate"]["x"]["y"] == pytest.approx((3.5 + bob_xy) / 6)
    assert rep["win_rate"]["x"]["z"] == 1.0 and rep["win_rate"]["y"]["z"] == 1.0
    assert rep["systems"] == ["x", "y", "z"]
    assert (out / "review.png").stat().st_size > 1000 and (out / "review.md").exists()
    pairs = tmp_path / "pairs.jsonl"
    subprocess.run([sys.executable, "-m", "tools.review", "pairs", "--db", db, "--out",
                    str(pairs)], cwd=REPO, check=True, capture_output=True,
                   env={**os.environ, "PYTHONPATH": REPO})
    lines = [json.loads(x) for x in pairs.read_text().splitlines()]
    assert len(lines) == 8  # 10 ratings less one tie and one skip
    assert all(p["chosen"].endswith(f"from {p['chosen_system']}") for p in lines)
