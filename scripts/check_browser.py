"""Drives `masklm serve`'s web page in a real browser (Debian's chromium + chromium-driver,
through Selenium) and checks what it renders against the API.

    python scripts/check_browser.py --url http://127.0.0.1:PORT --run demo \
        --text "Catalysis of the reaction: ATP + H2O = ADP + <mask>." --screenshots DIR

1. Loads `/`, types the text, submits, waits for every model's column, and reads the rendered
   top-k (token ids and scores) from the DOM; each must equal POST /v1/fill-mask for that model
   (with the text's mask token written as that model's own, as the page does).
2. Opens the run tab and waits for the server-drawn SVG charts; each must hold polylines with
   data points.
3. Saves a screenshot of each view into --screenshots.

Exits non-zero, saying what differed, on any mismatch. Tests: tests/serve.rs.
"""

import argparse
import json
import os
import sys
import urllib.request

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait


def api(url, path, body=None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.load(response)


def browser(chromium, chromedriver):
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,900"]:
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(executable_path=chromedriver), options=options)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--text", required=True)
    parser.add_argument("--run", required=True)
    parser.add_argument("--screenshots", required=True)
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--chromedriver", default="/usr/bin/chromedriver")
    args = parser.parse_args()
    os.makedirs(args.screenshots, exist_ok=True)
    models = api(args.url, "/v1/models")["models"]
    failures = []
    driver = browser(args.chromium, args.chromedriver)
    try:
        driver.get(args.url + "/")
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "true")
        box = driver.find_element(By.ID, "text")
        box.clear()
        box.send_keys(args.text)
        driver.find_element(By.ID, "submit").click()
        wait.until(lambda d: d.find_element(By.ID, "results").get_attribute("aria-busy") == "false"
                   and len(d.find_elements(By.CSS_SELECTOR, "#results .model")) == len(models))
        for column in driver.find_elements(By.CSS_SELECTOR, "#results .model"):
            name = column.get_attribute("data-model")
            model = next(m for m in models if m["name"] == name)
            text = args.text
            for other in models:
                text = text.replace(other["mask_token"], model["mask_token"])
            expected = api(args.url, "/v1/fill-mask", {"inputs": text, "top_k": 5, "model": name})
            expected = [c for mask in (expected if isinstance(expected[0], list) else [expected]) for c in mask]
            rows = column.find_elements(By.CSS_SELECTOR, ".candidate")
            shown = [(int(r.get_attribute("data-token")), float(r.get_attribute("data-score")),
                      r.find_element(By.CSS_SELECTOR, ".token").text) for r in rows]
            if [t for t, _, _ in shown] != [c["token"] for c in expected]:
                failures.append(f"{name}: page shows tokens {shown}, the API {expected}")
                continue
            for (token, score, label), c in zip(shown, expected):
                if abs(score - c["score"]) > 1e-6:
                    failures.append(f"{name}: token {token} scored {score} on the page, {c['score']} by the API")
                if label.strip() != c["token_str"].strip():
                    failures.append(f"{name}: token {token} labelled {label!r}, the API says {c['token_str']!r}")
            print(f"{name}: page top-{len(shown)} = API: {[label for _, _, label in shown]}")
        driver.save_screenshot(os.path.join(args.screenshots, "fill-mask.png"))

        driver.find_element(By.CSS_SELECTOR, f'#tabs button[data-run="{args.run}"]').click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#charts svg polyline")) > 0)
        charts = driver.find_elements(By.CSS_SELECTOR, "#charts svg")
        points = [int(p.get_attribute("data-points"))
                  for p in driver.find_elements(By.CSS_SELECTOR, "#charts svg polyline")]
        if len(charts) < 3 or min(points) < 1:
            failures.append(f"run tab: {len(charts)} charts with {points} points")
        for chart in charts:
            size = chart.size
            if size["width"] < 100 or size["height"] < 100:
                failures.append(f"run tab: a chart renders at {size}")
        print(f"run tab: {len(charts)} charts, {sum(points)} points in {len(points)} curves")
        driver.save_screenshot(os.path.join(args.screenshots, "run.png"))
    finally:
        driver.quit()
    if failures:
        print("\n".join(failures), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
