"""The demo as a hostile client sees it: raw HTTP (no gradio_client, so no `meta` fields and
any JSON at all) against a real server (`python -m unified.cli demo`, one child process for
this module) on the tiny random-weight unified model. Each case checks the message and that
the next good request still works."""

from __future__ import annotations

import base64
import io
import json
import os
import struct
import time
import zlib
from pathlib import Path

import httpx
import pytest
from gradio.utils import get_upload_folder
from gradio_client import Client, handle_file
from PIL import Image

from demo.examples import load_examples
from demo.files import REFUSED_PATH
from demo.process import DemoProcess

GOOD = {  # one cheap good request per endpoint (raw HTTP data lists)
    "generate_text": ["The function returns", 4, 2, 2.0, 1.0, 0.0, 0],
    "text_to_image": ["a large red circle at the top left", 2, 4.0, 1.0, 0, 0],
}


@pytest.fixture(scope="module")
def demo(tiny_unified_checkpoint):
    proc = DemoProcess(tiny_unified_checkpoint, threads=1, concurrency=2)
    with proc as url:
        yield proc, url


def call(url: str, api: str, data, timeout: float = 60) -> tuple[str, object]:
    """POST /gradio_api/call/<api> with `data` (any JSON; a str is sent as it is), then read the
    event stream: ("complete", outputs), ("error", message) or ("http <code>", body)."""
    body = data if isinstance(data, str) else json.dumps({"data": data})
    r = httpx.post(f"{url}gradio_api/call/{api}", content=body, timeout=30,
                   headers={"Content-Type": "application/json"})
    if r.status_code != 200:
        return f"http {r.status_code}", r.text
    reply = httpx.get(f"{url}gradio_api/call/{api}/{r.json()['event_id']}", timeout=timeout).text
    event, payload = None, None
    for line in reply.splitlines():  # the last event wins (streamed updates come first)
        if line.startswith("event: "):
            event = line[len("event: "):]
        elif line.startswith("data: "):
            payload = json.loads(line[len("data: "):])
    if event == "error" and isinstance(payload, dict):  # {"error": message, "title": ...}
        payload = payload.get("error")
    return event, payload


def caption_data(image) -> list:
    return [image, "", "", 4, 2, 2.0, 1.0, 0.0, 0, 1]


def good(url: str) -> None:
    event, out = call(url, "generate_text", GOOD["generate_text"])
    assert event == "complete" and "model evaluations" in out[1], (event, out)


def red_png(path: Path) -> Path:
    Image.new("RGB", (32, 32), (255, 0, 0)).save(path)
    return path


# --------------------------------------------------------------------------- 1. file parameters
def test_a_path_outside_the_uploads_is_refused_without_telling_what_it_is(demo, tmp_path):
    """A file parameter without `meta` (Gradio checks only those with it) naming a file on the
    server: refused with one message, the same whether the path is an image, a text file, a
    folder or nothing, so it tells nothing about the server's files."""
    _, url = demo
    image = red_png(tmp_path / "outside.png")  # a readable image outside the upload folder
    link_dir = Path(get_upload_folder()) / f"cola-test-{os.getpid()}"
    link_dir.mkdir(parents=True, exist_ok=True)
    link = link_dir / "link.png"  # inside the upload folder, pointing outside
    link.unlink(missing_ok=True)
    link.symlink_to(image)
    try:
        paths = [str(image), "/etc/passwd", "/etc", "/no/such/file.png", str(tmp_path),
                 f"{get_upload_folder()}/../../etc/passwd", "relative/../../x.png",
                 "http://127.0.0.1:1/x.png", str(link), "/etc/passwd\u0000.png"]
        replies = [call(url, "caption", caption_data({"path": p})) for p in paths]
        replies.append(call(url, "caption", caption_data({"path": str(image), "url": None,
                                                          "orig_name": "outside.png"})))
    finally:
        link.unlink(missing_ok=True)
        link_dir.rmdir()
    assert all(event == "error" for event, _ in replies), replies
    assert {msg for _, msg in replies} == {REFUSED_PATH}
    good(url)


def test_uploads_and_examples_are_still_accepted(demo, tmp_path):
    _, url = demo
    client = Client(url, verbose=False)  # a real upload (with meta) of the same kind of file
    caption, stats = client.predict(handle_file(str(red_png(tmp_path / "up.png"))), "", "", 4, 2,
                                    2.0, 1.0, 0.0, 0, 1, api_name="/caption")
    assert isinstance(caption, str) and "model evaluations" in stats
    example = str(load_examples().images[0].path)  # the example folder, without meta
    event, out = call(url, "caption", caption_data({"path": example}))
    assert event == "complete" and "model evaluations" in out[1], out


# --------------------------------------------------------------------------- 2. data: URL bomb
def black_png(side: int) -> bytes:
    """A side x side all-black grayscale PNG written row by row (a few hundred KB at 12000:
    what a decompression bomb looks like, without holding its pixels in memory here)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    z, row, parts = zlib.compressobj(9), bytes(side + 1), []
    for _ in range(side):
        parts.append(z.compress(row))
    parts.append(z.flush())
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"".join(parts))
            + chunk(b"IEND", b""))


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def _rss_mb(pid: int, key: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


def test_a_data_url_bomb_is_refused_from_its_header(demo):
    """A 12000 x 12000 PNG of a few hundred KB sent as a data: URL: refused from the size in
    its header, before its 144 MB of pixels are decoded (the server's peak memory does not
    grow by that much), and the server keeps serving."""
    proc, url = demo
    bomb = black_png(12_000)
    assert len(bomb) < 1_000_000
    pid = proc.proc.pid
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # reset the peak resident size
    before = _rss_mb(pid, "VmRSS")
    t0 = time.perf_counter()
    event, msg = call(url, "caption", caption_data({"path": None, "url": data_url(bomb)}))
    seconds = time.perf_counter() - t0
    peak = _rss_mb(pid, "VmHWM")
    assert event == "error" and "too large (12000 x 12000)" in msg, (event, msg)
    assert peak - before < 100, f"the server's peak memory grew by {peak - before:.0f} MB"
    print(f"\nbomb refused in {seconds:.2f} s, peak memory +{peak - before:.0f} MB")
    good(url)


def test_data_url_images_small_broken_and_not_base64(demo):
    _, url = demo
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (0, 0, 255)).save(buf, format="PNG")
    event, out = call(url, "caption", caption_data({"path": None, "url": data_url(buf.getvalue())}))
    assert event == "complete" and "model evaluations" in out[1], out
    cases = [("data:image/png;base64,!!!notbase64", "not valid base64"),
             (data_url(b"\x89PNG\r\n\x1a\n" + b"junk" * 20), "not a readable image"),
             ("data:image/png,rawbytes", "data:image/...;base64"),
             (data_url(buf.getvalue()[:-40]), "not a readable image")]
    for bad, words in cases:
        event, msg = call(url, "caption", caption_data({"path": None, "url": bad}))
        assert event == "error" and words in msg, (bad[:40], event, msg)
    good(url)
