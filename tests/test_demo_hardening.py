"""The demo as a hostile client sees it: raw HTTP (no gradio_client, so no `meta` fields and
any JSON at all) against a real server (`python -m unified.apps.cli demo`, one child process for
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
    "text_to_image": ["a large red circle at the top left", 2, 4.0, 1.0, 0, 0, 32, 32],
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


# --------------------------------------------------------------------------- 8. readable errors
API_PARAMS = {"generate_text": 7, "caption": 10, "text_to_image": 8}
NUMBER_SLOTS = {"generate_text": range(1, 7), "caption": range(3, 10), "text_to_image": range(1, 8)}
TEXT_SLOTS = {"generate_text": [0], "caption": [1, 2], "text_to_image": [0]}


def good_data(api: str) -> list:
    if api == "caption":
        return caption_data({"path": str(load_examples().images[0].path)})
    return list(GOOD[api])


def test_an_unknown_api_name_is_a_404_naming_the_endpoints(demo):
    _, url = demo
    status, body = call(url, "no_such_thing", ["hi"])
    assert status == "http 404", (status, body)
    assert json.loads(body)["error"] == ("no API endpoint named /no_such_thing; the endpoints "
                                         "are /caption, /generate_text, /text_to_image")
    good(url)


@pytest.mark.parametrize("api", list(API_PARAMS))
def test_too_few_data_items_name_the_parameters(demo, api):
    _, url = demo
    for n in (0, 1, API_PARAMS[api] - 1):
        event, msg = call(url, api, good_data(api)[:n])
        assert event == "error" and msg.startswith(f"/{api} takes {API_PARAMS[api]} values ("), msg
        assert msg.endswith(f"got {n}")
    good(url)


@pytest.mark.parametrize("api", list(API_PARAMS))
def test_400_digit_integers_in_every_number_field(demo, api):
    _, url = demo
    for slot in NUMBER_SLOTS[api]:
        data = good_data(api)
        data[slot] = 10**400
        event, msg = call(url, api, data)
        assert event == "error" and "got a 401-digit number" in msg, (slot, event, msg)
    good(url)


@pytest.mark.parametrize("api", list(API_PARAMS))
def test_lone_surrogates_in_every_text_field(demo, api):
    _, url = demo
    for slot in TEXT_SLOTS[api]:
        data = good_data(api)
        data[slot] = "a red \ud83d circle"  # half of a surrogate pair: JSON allows it
        event, msg = call(url, api, data)
        assert event == "error" and "position 7: U+D83D is a lone surrogate" in msg, msg
    good(url)


def test_fractional_counts_are_refused_not_rounded(demo):
    _, url = demo
    data = good_data("text_to_image")
    data[1] = 2.5  # steps
    event, msg = call(url, "text_to_image", data)
    assert (event, msg) == ("error", "steps must be a whole number, got 2.5")
    data = good_data("text_to_image")
    data[5] = 1.5  # trajectory frames
    event, msg = call(url, "text_to_image", data)
    assert (event, msg) == ("error", "trajectory frames must be a whole number, got 1.5")
    good(url)


@pytest.mark.parametrize("image,words", [
    (5, "the image must be an uploaded file"),
    ("/etc/passwd", "the image must be an uploaded file"),
    ({"path": 5}, "path: Input should be a valid string"),
    ({"path": "/etc/passwd", "meta": {"_type": "gradio.FileData"}}, REFUSED_PATH),
])
def test_an_image_of_the_wrong_kind(demo, image, words):
    _, url = demo
    event, msg = call(url, "caption", caption_data(image))
    assert event == "error" and words in msg, msg
    good(url)


# --------------------------------------------------------------------------- fuzz
def random_value(rng, depth: int = 0):
    kind = rng.randrange(12 if depth < 2 else 9)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind == 2:
        return rng.choice([0, -1, 1, 7, 64, 2**31, 2**63, -(2**63), 10**400, -(10**20)])
    if kind == 3:
        return rng.choice([0.5, -2.5, 1e308, 1e-308, float("nan"), float("inf"),
                           -float("inf"), 3.0])
    if kind == 4:
        return ""
    if kind == 5:
        return "".join(chr(rng.choice([rng.randrange(32, 127), rng.randrange(0x80, 0xD7FF),
                                       rng.randrange(0xD800, 0xE000), 0, 0x202E]))
                       for _ in range(rng.randrange(1, 40)))
    if kind == 6:
        return "x" * rng.choice([2001, 10_000])
    if kind == 7:
        return rng.choice(["a large red circle at the top left", "The function returns"])
    if kind == 8:
        return rng.choice(["/etc/passwd", "data:image/png;base64,AAAA", "../../x.png"])
    if kind == 9:
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    if kind == 10:
        return {rng.choice(["path", "url", "meta", "orig_name", "size", "x"]):
                random_value(rng, depth + 1) for _ in range(rng.randrange(4))}
    return {"path": rng.choice([None, "/etc", "/tmp", str(load_examples().images[0].path)]),
            "url": rng.choice([None, "data:image/png;base64,iVBORw0KGgo=", "http://127.0.0.1:1/"]),
            **({"meta": {"_type": "gradio.FileData"}} if rng.random() < 0.5 else {})}


def random_body(rng, api: str) -> str | bytes:
    """A request body: mostly the endpoint's good values with some replaced by random ones
    (so requests get past the first check), sometimes a wrong number of items, sometimes not
    a data list at all, in varied JSON encodings (NaN tokens, raw UTF-8, invalid UTF-8)."""
    roll = rng.random()
    if roll < 0.05:
        return rng.choice([b"\xff\xfe{", b"", b"[]", b'{"data": {}}', b'{"data": null}'])
    data = good_data(api)
    for i in range(len(data)):
        if rng.random() < 0.3:
            data[i] = random_value(rng)
    if roll < 0.15:
        data = data[: rng.randrange(len(data))] if rng.random() < 0.5 else data + [1, "x"]
    text = json.dumps({"data": data}, ensure_ascii=rng.random() < 0.5)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate written raw: send it as \\u escapes
        return json.dumps({"data": data}).encode("ascii")


def test_fuzz_the_three_endpoints_over_raw_http(demo):
    """Random JSON to /generate_text, /caption and /text_to_image on the loopback server,
    at most 90 requests or 120 s: every answer is a result or a readable message (an error
    event with text, or an HTTP 4xx with a JSON reason), never {"error": null} or a 5xx, and
    the server stays up."""
    import random

    proc, url = demo
    assert url.startswith("http://127.0.0.1:")
    rng = random.Random(1234)
    seen: dict[str, int] = {}
    t_end, n = time.monotonic() + 120, 0
    while n < 90 and time.monotonic() < t_end:
        api = rng.choice(list(API_PARAMS))
        body = random_body(rng, api)
        r = httpx.post(f"{url}gradio_api/call/{api}", content=body, timeout=30,
                       headers={"Content-Type": "application/json"})
        what = f"request {n} to /{api}: {body[:200]!r}"
        if r.status_code != 200:
            assert 400 <= r.status_code < 500, (what, r.status_code, r.text)
            reason = r.json()
            assert reason.get("detail") or reason.get("error"), (what, r.text)
            seen[f"http {r.status_code}"] = seen.get(f"http {r.status_code}", 0) + 1
        else:
            reply = httpx.get(f"{url}gradio_api/call/{api}/{r.json()['event_id']}",
                              timeout=60).text
            events = [line[7:] for line in reply.splitlines() if line.startswith("event: ")]
            last = [line[6:] for line in reply.splitlines() if line.startswith("data: ")][-1]
            assert events and events[-1] in ("complete", "error"), (what, reply[-500:])
            payload = json.loads(last)
            if events[-1] == "error":
                msg = payload.get("error") if isinstance(payload, dict) else payload
                assert isinstance(msg, str) and msg.strip(), (what, reply[-500:])
                assert "Traceback" not in msg
            else:
                assert isinstance(payload, list) and payload, (what, payload)
            seen[events[-1]] = seen.get(events[-1], 0) + 1
        n += 1
        assert proc.alive(), what
    print(f"\nfuzz: {n} requests: {seen}")
    assert n >= 30 and seen.get("error", 0) > 0 and seen.get("complete", 0) > 0, seen
    good(url)
