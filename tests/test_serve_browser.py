"""The page at GET / in a real headless Chromium (Debian's chromium + chromedriver, driven by selenium): type a
prompt, see the answer stream in, and see a picture appear for the demo model."""

import shutil
import tempfile
import time

import pytest
from serve_process import ServerProcess

CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def browser():
    if not (shutil.which(CHROMIUM) and shutil.which(DRIVER)):
        pytest.fail("Chromium is not installed: apt-get install -y chromium chromium-driver (make install-test does)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="fuselm-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def server():
    with ServerProcess("--quiet") as proc:
        yield proc


def wait_for(predicate, timeout: float = 120):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("timed out waiting for the page")


def test_page_streams_text_and_draws_a_picture(browser, server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    browser.get(server.url + "/")
    assert wait_for(lambda: "demo" in browser.find_element(By.ID, "model-info").text)
    assert "draws pictures" in browser.find_element(By.ID, "model-info").text

    # text: the answer grows chunk by chunk in the assistant bubble
    browser.execute_script("""
        window.seen = [];
        new MutationObserver(() => {
          const b = document.querySelector('.message.assistant');
          if (b) window.seen.push(b.textContent);
        }).observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true});""")
    browser.find_element(By.ID, "temperature").clear()
    browser.find_element(By.ID, "temperature").send_keys("0")
    box = browser.find_element(By.ID, "prompt")
    box.send_keys("draw a red circle", Keys.ENTER)
    wait_for(lambda: browser.find_element(By.ID, "send").is_enabled()
             and browser.find_elements(By.CSS_SELECTOR, ".message.assistant .meta"))
    seen = [s for s in browser.execute_script("return window.seen") if s]
    assert len(set(seen)) >= 3, seen  # several partial texts: it streamed
    assert not browser.find_elements(By.CSS_SELECTOR, ".message.error")

    # a picture: drawn progressively (partial pictures first), then done
    Select(browser.find_element(By.ID, "modalities")).select_by_value("image")
    browser.execute_script("""
        window.sources = [];
        new MutationObserver((records) => {
          for (const r of records) if (r.target.tagName === 'IMG' && r.attributeName === 'src')
            window.sources.push(r.target.src.length);
        }).observe(document.getElementById('log'), {subtree: true, attributes: true});""")
    box.send_keys("a blue square on the left", Keys.ENTER)
    img = wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "img.picture[data-status=done]"))[0]
    wait_for(lambda: browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img))
    assert img.get_attribute("naturalWidth") == "32" and img.get_attribute("src").startswith("data:image/png")
    assert len(browser.execute_script("return window.sources")) >= 2  # partial pictures came before the last

    # a picture in: uploaded, shown in the user's message, read by the model (the answer counts its tokens)
    from fuselm.demo.world import render, sample_scenes

    render(sample_scenes(1, seed=2)[0]).save(tmp_path / "scene.png")
    Select(browser.find_element(By.ID, "modalities")).select_by_value("text")
    browser.find_element(By.ID, "picture").send_keys(str(tmp_path / "scene.png"))
    wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#attachments img"))
    box.send_keys("what is in the picture?", Keys.ENTER)
    wait_for(lambda: len(browser.find_elements(By.CSS_SELECTOR, ".message.assistant .meta")) == 3)
    assert browser.find_elements(By.CSS_SELECTOR, ".message.user img")
    assert not browser.find_elements(By.CSS_SELECTOR, ".message.error")
