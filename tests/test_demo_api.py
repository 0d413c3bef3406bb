"""The Gradio demo as a client sees it: a real server (`python -m unified.apps.cli demo`, a child
process on a loopback port) on the tiny random-weight unified model, driven by gradio_client.
These check the mechanics (endpoints, streaming, images, errors, load); tests/
test_demo_meaning.py checks that the bundled model's answers mean something."""

from __future__ import annotations

import json
import re
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from demo.examples import load_examples
from demo.process import DemoProcess

STATS = re.compile(r"^(?P<s>\d+\.\d+) s · (?P<nfe>\d+) model evaluations \(nfe\)")
ENDPOINTS = {
    "/generate_text": ["prompt", "max_new_tokens", "steps", "guidance", "shift", "temperature",
                       "seed"],
    "/caption": ["image", "question", "prefix", "max_new_tokens", "steps", "guidance", "shift",
                 "temperature", "seed", "candidates"],
    "/text_to_image": ["prompt", "steps", "guidance", "shift", "seed", "frames", "height",
                       "width"],
}


@pytest.fixture(scope="module")
def server(tiny_unified_checkpoint):
    proc = DemoProcess(tiny_unified_checkpoint, threads=1, concurrency=2)
    with proc as url:
        yield proc, url


@pytest.fixture(scope="module")
def client(server):
    return Client(server[1], verbose=False)


def nfe_of(stats: str) -> int:
    m = STATS.match(stats)
    assert m, stats
    return int(m["nfe"])


def test_serves_on_loopback_with_named_endpoints(server, client):
    proc, url = server
    assert url.startswith("http://127.0.0.1:")
    assert "Running on local URL:  http://127.0.0.1:" in proc.log_text()
    api = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    for name, params in ENDPOINTS.items():
        assert name in api, sorted(api)
        assert [p["parameter_name"] for p in api[name]["parameters"]] == params


def test_generate_text_streams_block_by_block(client):
    job = client.submit("The function returns", 24, 4, 2.0, 1.0, 0.0, 7, api_name="/generate_text")
    text, stats = job.result(timeout=60)
    updates = job.outputs()
    assert len(updates) >= 3, "one update per block (block size 4) and a final one"
    assert text and updates[-1][0] == text
    assert all(text.startswith(u[0]) for u in updates), "each update extends the last"
    assert nfe_of(stats) > 0 and "blocks" in stats and "generating" not in stats
    # one shared model, no shared generation state: the same seed gives the same text
    again, _ = client.predict("The function returns", 24, 4, 2.0, 1.0, 0.0, 7,
                              api_name="/generate_text")
    assert again == text
    other, _ = client.predict("The function returns", 24, 4, 2.0, 1.0, 0.0, 8,
                              api_name="/generate_text")
    assert other != text


def test_caption_keeps_the_prefix(client):
    ex = load_examples().images[0]
    caption, stats = client.predict(handle_file(str(ex.path)), "", "a large", 16, 4, 2.0, 1.0,
                                    0.0, 0, api_name="/caption")
    assert caption.startswith("a large") and len(caption) > len("a large")
    assert nfe_of(stats) > 0
    answer, _ = client.predict(handle_file(str(ex.path)), "how many objects are there?", "", 8,
                               4, 2.0, 1.0, 0.0, 0, api_name="/caption")
    assert isinstance(answer, str)


def test_caption_candidates_rerank_among_samples(client):
    """candidates = K samples K captions (seeds seed..seed+K-1) and keeps one of them: the
    answer is one of the plain samples, at the cost of more model evaluations."""
    image = handle_file(str(load_examples().images[0].path))
    plain = [client.predict(image, "", "", 8, 2, 2.0, 1.0, 0.0, s, 1, api_name="/caption")
             for s in range(3)]
    best, stats = client.predict(image, "", "", 8, 2, 2.0, 1.0, 0.0, 0, 3, api_name="/caption")
    assert best in {text for text, _ in plain}
    assert nfe_of(stats) > sum(nfe_of(s) for _, s in plain)
    with pytest.raises(AppError, match="candidates must be between 1 and 16"):
        client.predict(image, "", "", candidates=17, api_name="/caption")
    _good(client)


def test_text_to_image_shows_an_enlarged_copy_and_the_trajectory(client):
    shown, real, strip, stats = client.predict("a large red circle at the top left", 8, 4.0, 1.0,
                                               3, 4, api_name="/text_to_image")
    real_img, shown_img = Image.open(real), Image.open(shown)
    assert real_img.size == (32, 32) and shown_img.size == (256, 256)
    assert np.array_equal(np.asarray(shown_img.convert("RGB")),
                          np.asarray(real_img.convert("RGB").resize((256, 256), Image.NEAREST)))
    assert 4 <= len(strip) <= 5 and strip[0]["caption"] == "t = 1.00"
    frames = [np.asarray(Image.open(f["image"]).convert("RGB"), dtype=np.float32) for f in strip]
    assert np.abs(frames[0] - frames[-1]).mean() > 1.0, "the trajectory moves"
    assert np.array_equal(frames[-1], np.asarray(shown_img.convert("RGB"), dtype=np.float32))
    assert nfe_of(stats) >= 8 and "32 x 32" in stats


def test_text_to_image_draws_a_non_square_size_and_refuses_a_bad_one(client):
    shown, real, strip, stats = client.predict("a large red circle at the top left", 2, 4.0, 1.0,
                                               3, 0, 16, 48, api_name="/text_to_image")
    assert Image.open(real).size == (48, 16) and Image.open(shown).size == (240, 80)
    assert "48 x 16" in stats
    with pytest.raises(AppError, match="height must be a positive multiple of 8 pixels"):
        client.predict("a small red circle", height=20, api_name="/text_to_image")
    with pytest.raises(AppError, match="width must be between 8 and 128"):
        client.predict("a small red circle", width=256, api_name="/text_to_image")
    _good(client)


def _good(client) -> None:
    text, stats = client.predict("The function returns", 8, 2, 2.0, 1.0, 0.0, 0,
                                 api_name="/generate_text")
    assert text and nfe_of(stats) > 0


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad-inputs")
    (d / "notes.txt").write_text("not an image\n")
    (d / "fake.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    Image.new("1", (10_000, 10_000)).save(d / "huge.png")  # 100 megapixels, a small file
    return d


TEXT_CASES = [  # (what, keyword arguments of /generate_text, words the message must hold)
    ("empty prompt", dict(prompt="   "), ["prompt", "empty"]),
    ("100 000-character prompt", dict(prompt="x" * 100_000), ["too long", "100000"]),
    ("guidance above the range", dict(prompt="hi", guidance=1e6), ["guidance", "between"]),
    ("negative guidance", dict(prompt="hi", guidance=-1.0), ["guidance", "between"]),
    ("zero steps", dict(prompt="hi", steps=0), ["steps", "between"]),
    ("too many steps", dict(prompt="hi", steps=10_000), ["steps", "between"]),
    ("fractional seed", dict(prompt="hi", seed=1.5), ["seed", "whole"]),
    ("negative seed", dict(prompt="hi", seed=-1), ["seed", "between"]),
    ("missing number", dict(prompt="hi", shift=None), ["shift", "missing"]),
    ("text for a number", dict(prompt="hi", temperature="hot"), ["temperature", "number"]),
]


@pytest.mark.parametrize("what,kwargs,words", TEXT_CASES, ids=[c[0] for c in TEXT_CASES])
def test_bad_text_input_is_a_readable_error(client, what, kwargs, words):
    with pytest.raises(AppError) as err:
        client.predict(**kwargs, api_name="/generate_text")
    msg = str(err.value)
    assert all(w in msg for w in words), msg
    assert "upstream Gradio app" not in msg and "Traceback" not in msg
    _good(client)  # the server keeps serving


@pytest.mark.parametrize("name,words", [("notes.txt", ["not a readable image", "notes.txt"]),
                                        ("fake.png", ["not a readable image"]),
                                        ("huge.png", ["too large", "10000 x 10000"]),
                                        (None, ["no image"])])
def test_bad_image_upload_is_a_readable_error(client, bad_files, name, words):
    image = handle_file(str(bad_files / name)) if name else None
    with pytest.raises(AppError) as err:
        client.predict(image, "", "", api_name="/caption")
    assert all(w in str(err.value) for w in words), str(err.value)
    _good(client)


def test_bad_image_prompt_and_range(client):
    with pytest.raises(AppError, match="prompt is empty"):
        client.predict("", api_name="/text_to_image")
    with pytest.raises(AppError, match="frames must be between 0 and 16"):
        client.predict("a small red circle at the top", frames=100, api_name="/text_to_image")
    _good(client)


@pytest.mark.parametrize("field", [3, 4, 5])  # guidance, shift, temperature
def test_nan_sent_as_raw_json_is_refused(server, client, field):
    """gradio_client refuses to encode NaN, but any HTTP client can send it."""
    url = server[1] + "gradio_api/call/generate_text"
    data = ["hello", 8, 2, 2.0, 1.0, 0.0, 0]
    data[field] = float("nan")
    body = json.dumps({"data": data})  # Python writes the non-standard token NaN
    assert "NaN" in body
    event = httpx.post(url, content=body, headers={"Content-Type": "application/json"}).json()
    reply = httpx.get(f"{url}/{event['event_id']}", timeout=30).text
    assert "event: error" in reply and "finite number, got nan" in reply, reply
    _good(client)


def test_sixteen_concurrent_requests_all_complete(server):
    """A burst of 16 users on a server that computes 2 at a time: all wait in the queue and
    finish, none errors, and requests i and i + 8 (the same arguments) get the same result,
    so concurrent requests share no generation state. The latency spread is printed
    (bench/demo_load.py measures it on any model)."""
    client = Client(server[1], verbose=False)

    def one(i: int) -> tuple[float, object]:
        k = i % 8
        t0 = time.perf_counter()
        if k % 4 == 3:
            out = client.predict("a small blue square at the center", 8, 4.0, 1.0, k, 2,
                                 api_name="/text_to_image")
            result = (np.asarray(Image.open(out[1])), out[-1])
        else:
            out = client.predict(f"Prompt number {k} says", 16, 4, 2.0, 1.0, 0.0, k,
                                 api_name="/generate_text")
            result = out
        return time.perf_counter() - t0, result

    with ThreadPoolExecutor(16) as pool:
        done = list(pool.map(one, range(16)))
    assert len(done) == 16 and all(nfe_of(out[-1]) > 0 for _, out in done)
    for i in range(8):
        a, b = done[i][1][0], done[i + 8][1][0]
        assert (np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b), i
    assert done[0][1][0] != done[1][1][0], "different seeds and prompts, different texts"
    assert server[0].alive()
    latencies = sorted(t for t, _ in done)
    print(f"\n16 concurrent requests: min {latencies[0]:.2f} s, median "
          f"{statistics.median(latencies):.2f} s, max {latencies[-1]:.2f} s")


def test_identical_concurrent_images_download_whole(server):
    """Eight users draw the same prompt with the same seed at once. Gradio's own caching of a
    returned PIL image rewrites one shared file in place, and a client could download it
    half-written (seen as 'peer closed connection without sending complete message body');
    the demo returns atomically written files instead (demo/files.py)."""
    client = Client(server[1], verbose=False)

    def one(_):
        shown, real, strip, _ = client.predict("a large red circle at the top left", 4, 4.0,
                                               1.0, 5, 4, api_name="/text_to_image")
        return [np.asarray(Image.open(p)) for p in (shown, real, *(f["image"] for f in strip))]

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(8)))
    for r in results[1:]:
        assert len(r) == len(results[0])
        assert all(np.array_equal(a, b) for a, b in zip(r, results[0]))
