"""Browser check of the Gradio demo (not part of pytest): start `cola demo`, open it in headless
Chromium, run each tab once and save a screenshot of it after the generation, then send an
empty prompt and save the error it shows. Fails (exit 1) if the page shows an error after a
good request, a result does not appear, or the bad request shows no readable message.

    apt-get install -y chromium && pip install -e ".[browser]"
    python bench/browser_check.py [--checkpoint DIR] [--out docs/screenshots]

Playwright drives the system Chromium (`--chromium /usr/bin/chromium`); it downloads no browser.
With a text-only checkpoint the image tabs must show their "text-only" notice instead.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from playwright.sync_api import Page, sync_playwright  # noqa: E402

from demo.process import DemoProcess  # noqa: E402
from unified.apps.cli import DEFAULT_CHECKPOINT  # noqa: E402

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
TOAST = "[data-testid='toast-body']"


class CheckFailed(Exception):
    pass


def shrink(path: Path) -> None:
    """Store a screenshot as a 256-colour PNG (a third of the size; screenshots are flat)."""
    from PIL import Image

    Image.open(path).convert("RGB").quantize(256).save(path, optimize=True)


def stats_ready(tab: str) -> str:
    """JS predicate: the tab's stats box shows a finished result."""
    return (f"() => {{ const t = document.querySelector('#{tab}-stats textarea');"
            f" return t && t.value.includes('model evaluations') && !t.value.includes('generating'); }}")


def no_error_toast(page: Page, where: str) -> None:
    toasts = page.locator(TOAST)
    if toasts.count():
        raise CheckFailed(f"{where}: the page shows an error: {toasts.first.inner_text()!r}")


def run_tab(page: Page, tab: str, label: str, out: Path, timeout_ms: int) -> str:
    page.get_by_role("tab", name=label).click()
    page.click(f"#{tab}-run")
    page.wait_for_function(stats_ready(tab), timeout=timeout_ms)
    if tab == "t2i":  # the images load after the stats
        page.wait_for_function("() => document.querySelectorAll('#t2i-trajectory img').length > 1"
                               " && document.querySelector('#t2i-image img')", timeout=timeout_ms)
        page.wait_for_timeout(500)
    no_error_toast(page, label)
    page.screenshot(path=str(out), full_page=True)
    shrink(out)
    result = page.locator(f"#{tab}-stats textarea").input_value()
    if tab != "t2i":
        text = page.locator(f"#{tab}-output textarea").input_value()
        if not text.strip():
            raise CheckFailed(f"{label}: empty result")
        result = f"{text!r} ({result})"
    return result


def run_example(page: Page, tab: str, label: str, example: str, field: str,
                timeout_ms: int) -> str:
    """Click an example (by its text): it fills the inputs (`field` gets `example`) and runs the
    task: one click shows a result."""
    page.get_by_role("tab", name=label).click()
    result = (f"document.querySelector('#{tab}-image img').src" if tab == "t2i" else
              f"document.querySelector('#{tab}-output textarea').value")
    before = page.evaluate(f"() => {result}")
    page.get_by_text(example, exact=True).first.click()
    page.wait_for_function(  # the inputs are filled and a new result is shown
        f"() => document.querySelector('#{tab}-{field} textarea').value === {example!r}"
        f" && {result} !== {before!r}", timeout=timeout_ms)
    page.wait_for_function(stats_ready(tab), timeout=timeout_ms)
    no_error_toast(page, f"{label} example")
    return page.locator(f"#{tab}-stats textarea").input_value()


def text_only_tab(page: Page, tab: str, label: str, out: Path) -> str:
    page.get_by_role("tab", name=label).click()
    notice = page.locator(f"#{tab}-unavailable")
    notice.wait_for(timeout=10_000)
    if "text-only" not in notice.inner_text() or page.locator(f"#{tab}-run").is_enabled():
        raise CheckFailed(f"{label}: a text-only checkpoint must show the notice and no button")
    page.screenshot(path=str(out), full_page=True)
    shrink(out)
    return "text-only notice shown, button disabled"


def bad_input(page: Page, out: Path) -> str:
    page.get_by_role("tab", name="Text → text").click()
    page.fill("#t2t-prompt textarea", "")
    page.click("#t2t-run")
    toast = page.locator(TOAST).first
    toast.wait_for(timeout=30_000)
    msg = toast.inner_text()
    page.wait_for_timeout(1000)  # the toast slides in
    page.screenshot(path=str(out), full_page=False)
    shrink(out)
    if "empty" not in msg:
        raise CheckFailed(f"an empty prompt showed {msg!r}, not a readable message")
    return msg


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    ap.add_argument("--out", default="docs/screenshots")
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    ap.add_argument("--threads", type=int, default=1, help="torch threads in the server")
    ap.add_argument("--timeout", type=float, default=120, help="seconds per generation")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from unified.apps.pipeline import UnifiedPipeline

    sees = UnifiedPipeline.from_pretrained(args.checkpoint, device="cpu").can_see_images
    tabs = [("t2t", "Text → text", "text-to-text"), ("i2t", "Image → text", "image-to-text"),
            ("t2i", "Text → image", "text-to-image")]
    failures = 0
    with DemoProcess(args.checkpoint, threads=args.threads) as url, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(url)
        page.wait_for_selector("#t2t-run", timeout=60_000)
        for tab, label, name in tabs:
            path = out / f"{name}.png"
            try:
                if tab == "t2t" or sees:
                    what = run_tab(page, tab, label, path, int(args.timeout * 1000))
                else:
                    what = text_only_tab(page, tab, label, path)
                print(f"ok   {label}: {what} -> {path}")
            except Exception as e:  # noqa: BLE001 - report every tab, then fail
                failures += 1
                print(f"FAIL {label}: {e}")
        examples = [("t2t", "Text → text", "Return the number of", "prompt")]
        if sees:
            examples += [("i2t", "Image → text", "how many objects are there?", "question"),
                         ("t2i", "Text → image", "a large yellow triangle at the bottom", "prompt")]
        for tab, label, example, field in examples:
            try:
                what = run_example(page, tab, label, example, field, int(args.timeout * 1000))
                print(f"ok   {label}, one click on the example {example!r}: {what}")
            except Exception as e:  # noqa: BLE001
                failures += 1
                print(f"FAIL {label}, example {example!r}: {e}")
        try:
            print(f"ok   bad input: {bad_input(page, out / 'bad-input.png')!r} -> "
                  f"{out / 'bad-input.png'}")
        except Exception as e:  # noqa: BLE001
            failures += 1
            print(f"FAIL bad input: {e}")
        for e in errors:
            failures += 1
            print(f"FAIL JavaScript error on the page: {e}")
        browser.close()
    print("browser check passed" if not failures else f"browser check: {failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
