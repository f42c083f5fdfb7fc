"""The README's screenshots of ``fullvq app``: the Generate tab after a click, the Tokenize tab after an upload.

    python benchmarks/app_screenshots.py PIPELINE_DIR IMAGE OUT_DIR CLASSES
    python benchmarks/app_screenshots.py fullvq-demo/generator-run/pipeline digit.png docs 3,7

Writes OUT_DIR/app_generate.png and OUT_DIR/app_tokenize.png, through Debian's Chromium (/usr/bin/chromium).
"""
import socket
import sys
from pathlib import Path

from playwright.sync_api import sync_playwright

from fullvq.jobs.app import build_app, load_models, serve

folder, upload, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
classes = sys.argv[4].split(",")
pipeline, tokenizer = load_models(folder)
app = build_app(pipeline, tokenizer, title=f"fullvq: {folder.resolve().parent.name}/{folder.name}")
with socket.socket() as probe:
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
serve(app, port=port, block=False)
flags = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]
with sync_playwright() as p:
    browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=flags)
    page = browser.new_page(viewport={"width": 1100, "height": 900}, device_scale_factor=1)
    page.set_default_timeout(120_000)
    page.goto(f"http://127.0.0.1:{port}/")
    box = page.get_by_label("Classes")
    for name in classes:
        box.fill(name)
        box.press("Enter")
    per_class = page.locator("#per-class input[type=number]")
    per_class.fill("8")
    per_class.press("Enter")
    page.get_by_role("button", name="Generate").click()
    page.wait_for_function(f"document.querySelectorAll('#samples img').length === {8 * len(classes)}")
    page.wait_for_timeout(1000)
    page.screenshot(path=str(out / "app_generate.png"), full_page=True)
    page.get_by_role("tab", name="Tokenize").click()
    page.locator("#upload input[type=file]").set_input_files(str(upload))
    page.get_by_role("button", name="Tokenize").click()
    page.get_by_text("PSNR").wait_for()
    page.wait_for_timeout(1500)
    page.screenshot(path=str(out / "app_tokenize.png"), full_page=True)
    browser.close()
app.close()
