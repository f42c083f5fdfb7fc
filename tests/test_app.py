"""``fullvq app``: the Gradio page in a real (headless) browser, plus its helpers without one."""

import os
import shutil
import socket
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_pipeline
from PIL import Image

gradio = pytest.importorskip("gradio", reason="the app needs the [app] extra: pip install -e '.[app]'")
from fullvq.jobs.app import build_app, generate, parse_classes, read_upload, serve, tokenize  # noqa: E402

CHROMIUM = os.environ.get("FULLVQ_CHROMIUM", "/usr/bin/chromium")
# Offline and quiet: no sandbox (CI runs as root), no GPU, no background calls to the internet.
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SCREENSHOT = os.environ.get("FULLVQ_APP_SCREENSHOT")  # set to a PNG path to keep a picture of the page


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_pipeline("gpt")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("uploads")
    torch.manual_seed(0)
    Image.fromarray(torch.randint(0, 256, (48, 40, 3), dtype=torch.uint8).numpy()).save(folder / "photo.png")
    (folder / "notes.txt").write_text("not an image")
    Image.new("RGB", (5000, 8)).save(folder / "banner.png")  # a tiny file, but 5,000 px wide
    return folder


def test_typed_names_synonyms_listed_entries_and_ids_pick_classes(pipe):
    assert parse_classes(pipe, ["tench", "1: golden retriever", "2", "Tinca tinca"]) == [0, 1, 2, 0]
    with pytest.raises(ValueError, match="unknown class name 'golden retreiver'.*close matches"):
        parse_classes(pipe, ["golden retreiver"])
    with pytest.raises(ValueError, match="pick at least one class"):
        parse_classes(pipe, [])


def test_sampling_reports_progress_token_by_token_so_the_page_can_show_it(pipe):
    seen = []

    def progress(steps):
        for step in steps:
            seen.append(step)
            yield step

    pipe.set_progress_bar_config(disable=True)
    original = pipe.progress_bar
    pipe.progress_bar = progress
    try:
        pipe([0, 1], generator=torch.Generator().manual_seed(0), output_type="pt")
    finally:
        pipe.progress_bar = original
    assert seen == list(range(64))  # one step per token of the 8 x 8 grid


def test_a_flow_pipeline_takes_steps_and_snapping_and_ignores_gpt_settings(tmp_path):
    flow = build_tiny_pipeline("flow")
    images, grid = generate(flow, ["crane", "0"], 2, 0, tmp_path, guidance_scale=2.0, num_inference_steps=2,
                            snap_to_codebook=True, temperature=0.5, top_k=3, top_p=0.9)
    assert len(images) == 4 and images[0].size == (32, 32)
    assert Image.open(grid).size[1] > 2 * 32  # a row per class
    with pytest.raises(ValueError, match="over the 64 images"):
        generate(flow, ["crane", "tench"], 40, 0, tmp_path)


def test_a_tokenizer_folder_gets_the_tokenize_tab_only(pipe, tmp_path):
    from fullvq.jobs.app import load_models

    pipe.tokenizer.save_pretrained(tmp_path / "model")
    pipeline, tokenizer = load_models(tmp_path / "model")
    assert pipeline is None and tokenizer.config.codebook_size == 64
    tabs = [block.label for block in build_app(tokenizer=tokenizer).blocks.values() if type(block).__name__ == "Tab"]
    assert tabs == ["Tokenize"]
    with pytest.raises(ValueError, match="neither a pipeline folder"):
        load_models(tmp_path)


def test_a_pipeline_folder_missing_a_component_is_named_as_such(pipe, tmp_path):
    import shutil

    from fullvq.jobs.app import load_models

    pipe.save_pretrained(tmp_path / "pipeline")
    shutil.rmtree(tmp_path / "pipeline" / "tokenizer")
    with pytest.raises(FileNotFoundError, match=r"pipeline[/\\]tokenizer has no config.json"):
        load_models(tmp_path / "pipeline")


def test_uploads_are_checked_before_decoding_and_tokenized_at_the_models_size(pipe, files):
    with pytest.raises(ValueError, match="notes.txt is not an image"):
        read_upload(files / "notes.txt")
    with pytest.raises(ValueError, match="5000 x 8 px, larger than"):
        read_upload(files / "banner.png")
    result = tokenize(pipe.tokenizer, read_upload(files / "photo.png"))
    assert result["reconstruction"].size == (32, 32) and result["indices"].shape == (8, 8)
    assert int(result["counts"].sum()) == 64 and result["psnr"] > 0


@pytest.fixture
def page(pipe):
    """A browser page on the app, served on a free local port; the server stops afterwards."""
    if not shutil.which(CHROMIUM) and not Path(CHROMIUM).is_file():
        pytest.skip(f"no Chromium at {CHROMIUM} (CI installs Debian's: apt-get install chromium)")
    playwright = pytest.importorskip("playwright.sync_api", reason="needs playwright: pip install -e '.[app]'")
    app = build_app(pipe)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    serve(app, port=port, block=False)
    try:
        with playwright.sync_playwright() as driver:
            browser = driver.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.set_default_timeout(30_000)
            page.goto(f"http://127.0.0.1:{port}/")
            yield page
            browser.close()
    finally:
        app.close()


def generate_in_page(page, class_name: str, per_class: int):
    box = page.get_by_label("Classes")
    box.fill(class_name)
    box.press("Enter")
    page.locator("#per-class input[type=number]").fill(str(per_class))
    page.locator("#per-class input[type=number]").press("Enter")
    page.get_by_role("button", name="Generate").click()


def tokenize_upload(page, path: Path):
    clear = page.locator("#upload").get_by_label("Clear")
    if clear.count():  # the file input comes back once the last upload is cleared
        clear.first.click()
    page.locator("#upload input[type=file]").set_input_files(str(path))
    page.get_by_role("button", name="Tokenize").click()


def test_the_page_generates_the_grid_and_tokenizes_an_upload_with_messages_for_bad_input(page, files):
    generate_in_page(page, "golden retriever", 3)
    page.wait_for_function("document.querySelectorAll('#samples img').length === 3")
    assert page.locator("#generate-message").inner_text().strip() == "3 images"
    assert "fullvq-samples.png" in page.locator("#grid a").first.get_attribute("href")  # the download

    page.get_by_label("Classes").fill("golden retreiver")
    page.get_by_label("Classes").press("Enter")
    page.get_by_role("button", name="Generate").click()
    page.get_by_text("unknown class name 'golden retreiver'").wait_for()

    page.get_by_role("tab", name="Tokenize").click()
    tokenize_upload(page, files / "photo.png")
    page.locator("#reconstruction img").wait_for()
    page.get_by_text("PSNR").wait_for()
    assert page.locator("#token-map img").count() == 1
    if SCREENSHOT:
        page.get_by_role("tab", name="Generate").click()
        page.screenshot(path=SCREENSHOT, full_page=True)
        page.get_by_role("tab", name="Tokenize").click()

    tokenize_upload(page, files / "notes.txt")
    page.get_by_text("notes.txt is not an image").wait_for()
    tokenize_upload(page, files / "banner.png")
    page.get_by_text("larger than the app takes").wait_for()


def test_the_served_page_says_where_it_is_and_names_the_command_lines_share_flag(pipe, capsys, monkeypatch):
    app = build_app(pipe)
    monkeypatch.setattr(type(app), "block_thread", lambda self: None)  # return instead of serving forever
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    try:
        serve(app, port=port, block=True)
    finally:
        app.close()
    out = capsys.readouterr().out
    assert f"serving http://127.0.0.1:{port}/" in out and "--share" in out
    assert "launch()" not in out  # Gradio's banner speaks to Python callers, not to `fullvq app` users


def test_the_app_command_refuses_a_missing_folder_before_loading_anything(capsys):
    from fullvq.cli import main

    assert main(["app", "no/such/folder"]) == 2
    assert "no such folder" in capsys.readouterr().err
