"""`cola serve` as a real child process on a free loopback port, driven by the official `openai`
client (and httpx for raw HTTP): completions and chat, streamed and not, captions of images,
image generation, auth, errors in the OpenAI format, a full queue, a client that goes away."""

from __future__ import annotations

import base64
import io
import os
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from demo.process import REPO
from tasks.shapes.world import render, scene_at
from unified.apps.cli_tasks import DEFAULT_CHECKPOINT
from unified.apps.process import ServeProcess

KEY = "test-key-123"
MODEL = "cola-demo"
PROMPT = "The function returns"
FAST = {"steps": 2}  # ODE steps per block: a fast, still real, generation


@pytest.fixture(scope="module")
def server():
    with ServeProcess(api_key=KEY, max_queue=4, threads=2,
                      extra_args=["--max-body-mb", "1"]) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def pipe():
    """The same checkpoint in this process: what the server must reproduce."""
    from unified.apps.pipeline import UnifiedPipeline

    return UnifiedPipeline.from_pretrained(DEFAULT_CHECKPOINT, device="cpu")


def post(server, path, body, key=KEY, **kw):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(server + path.lstrip("/"), json=body, headers=headers, timeout=120, **kw)


def assert_openai_error(r: httpx.Response, status: int, param: str | None = None,
                        words: str = ""):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert words.lower() in err["message"].lower(), err
    if param is not None:
        assert err["param"] == param, err


def png_data_url(image: Image.Image, fmt: str = "PNG", mime: str = "image/png") -> str:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return f"data:{mime};base64," + base64.b64encode(buf.getvalue()).decode()


def test_models_auth_and_health(server, client):
    assert [m.id for m in client.models.list()] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.AuthenticationError) as e:
        openai.OpenAI(base_url=server + "v1", api_key="wrong", max_retries=0).models.list()
    assert e.value.status_code == 401
    r = httpx.get(server + "v1/models")  # no key at all
    assert_openai_error(r, 401, words="no API key")
    assert_openai_error(post(server, "v1/completions", {"prompt": PROMPT}, key="nope"), 401)
    assert httpx.get(server + "health").json()["status"] == "ok"  # liveness needs no key


def test_completion_streams_the_same_text_block_by_block(client, pipe):
    kw = dict(model=MODEL, prompt=PROMPT, max_tokens=40, seed=5, extra_body=FAST)
    full = client.completions.create(**kw)
    text = full.choices[0].text
    blocks = list(pipe.generate_text(PROMPT, max_new_tokens=40, steps=2, seed=5, stream=True))
    assert text == blocks[-1].texts[0] and text.strip()
    assert full.usage.completion_tokens == sum(len(b.new_ids[0]) for b in blocks)
    assert full.usage.prompt_tokens == 1 + len(pipe.tokenizer.encode(PROMPT,
                                                                     add_special_tokens=False))
    chunks = list(client.completions.create(**kw, stream=True))
    deltas = [c.choices[0].text for c in chunks]
    assert "".join(deltas) == text
    assert 2 <= sum(bool(d) for d in deltas) <= len(blocks)  # one chunk per finished block
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason
    assert full.choices[0].finish_reason in ("stop", "length")
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_noise_scale_reaches_the_engine(client, pipe):
    """The flow's temperature is an extra field: the server's text is the pipeline's at the
    same noise_scale, and at 0 it no longer depends on the seed."""
    kw = dict(model=MODEL, prompt=PROMPT, max_tokens=12)
    got = [client.completions.create(**kw, seed=s, extra_body={**FAST, "noise_scale": ns})
           .choices[0].text for s, ns in ((1, 0.5), (1, 0.0), (2, 0.0))]
    want = pipe.generate_text(PROMPT, max_new_tokens=12, steps=2, seed=1, noise_scale=0.5).text
    assert got[0] == want and got[1] == got[2]


def test_chat_continues_the_conversation_with_n_choices(client, pipe):
    messages = [{"role": "system", "content": "Docs."},
                {"role": "user", "content": [{"type": "text", "text": "Open the file"}]}]
    kw = dict(model=MODEL, messages=messages, max_tokens=16, seed=7, n=2, extra_body=FAST)
    full = client.chat.completions.create(**kw)
    texts = [c.message.content for c in sorted(full.choices, key=lambda c: c.index)]
    want = pipe.generate_text(["Docs.\nOpen the file"] * 2, max_new_tokens=16, steps=2,
                              seed=[7, 8]).texts
    assert texts == want and texts[0] != texts[1]
    streamed, finish = ["", ""], [None, None]
    usage = None
    for c in client.chat.completions.create(**kw, stream=True,
                                            stream_options={"include_usage": True}):
        usage = c.usage or usage
        for ch in c.choices:
            streamed[ch.index] += ch.delta.content or ""
            finish[ch.index] = ch.finish_reason or finish[ch.index]
    assert streamed == texts
    assert finish == [c.finish_reason for c in sorted(full.choices, key=lambda c: c.index)]
    assert usage is not None and usage.completion_tokens == full.usage.completion_tokens > 0


def test_chat_with_an_image_gives_the_caption_of_cola_caption(client, pipe, tmp_path):
    image = render(scene_at(1, 0, 2))
    path = tmp_path / "scene.png"
    image.save(path)
    question = "how many objects are there?"
    cli = subprocess.run(
        [sys.executable, "-m", "unified.apps.cli", "caption", str(path), "--question", question,
         "--max-new-tokens", "16", "--steps", "2", "--seed", "3"], cwd=REPO,
        env={**os.environ, "COLA_THREADS": "1"}, capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0, cli.stderr
    content = [{"type": "text", "text": question},
               {"type": "image_url", "image_url": {"url": png_data_url(image)}}]
    out = client.chat.completions.create(model=MODEL, max_tokens=16, seed=3, extra_body=FAST,
                                         messages=[{"role": "user", "content": content}])
    assert out.choices[0].message.content == cli.stdout.strip() != ""
    # text that is not a question is the start of the caption, continued (streamed here)
    content[0]["text"] = "two objects:"
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=MODEL, max_tokens=16, seed=3, extra_body=FAST, stream=True,
        messages=[{"role": "user", "content": content}]) if c.choices)
    want = pipe.caption(image, prefix="two objects:", max_new_tokens=16, steps=2, seed=3).text
    assert streamed == want and streamed.startswith("two objects:")


def test_image_generation_returns_pngs_of_their_own_seed(client, pipe):
    prompt = "a large red circle at the top left"
    r = client.images.generate(model=MODEL, prompt=prompt, n=2, size="32x32",
                               response_format="b64_json", extra_body={"steps": 2, "seed": 4})
    images = [Image.open(io.BytesIO(base64.b64decode(d.b64_json))) for d in r.data]
    assert [(im.format, im.size) for im in images] == [("PNG", (32, 32))] * 2
    for k, im in enumerate(images):  # image k is drawn with seed 4 + k, as alone
        alone = pipe.text_to_image(prompt, steps=2, seed=4 + k).images[0]
        diff = np.abs(np.asarray(im.convert("RGB"), np.int16) - np.asarray(alone, np.int16))
        assert diff.max() <= 1


def test_a_non_square_size_is_drawn_as_the_pipeline_draws_it(client, pipe):
    prompt = "a small blue square"
    r = client.images.generate(model=MODEL, prompt=prompt, size="64x16",
                               response_format="b64_json", extra_body={"steps": 2, "seed": 5})
    image = Image.open(io.BytesIO(base64.b64decode(r.data[0].b64_json)))
    assert image.size == (64, 16)
    alone = pipe.text_to_image(prompt, steps=2, seed=5, height=16, width=64).images[0]
    diff = np.abs(np.asarray(image.convert("RGB"), np.int16) - np.asarray(alone, np.int16))
    assert diff.max() <= 1


def _gif_url() -> str:
    return png_data_url(Image.new("RGB", (8, 8)), "GIF", "image/png")


def _chat_image(url: str) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}]}]}


BAD = [  # (path, body, status, param, words)
    ("v1/completions", {"model": MODEL, "prompt": ""}, 400, "prompt", "empty"),
    ("v1/completions", {"model": MODEL, "prompt": "x" * 2001}, 400, "prompt", "too long"),
    ("v1/completions", {"model": MODEL, "prompt": PROMPT, "temperature": 5}, 400,
     "temperature", "temperature"),
    ("v1/completions", {"model": MODEL, "prompt": PROMPT, "top_p": 0}, 400, "top_p", "top_p"),
    ("v1/completions", {"model": MODEL, "prompt": PROMPT, "noise_scale": -1}, 400,
     "noise_scale", "noise_scale"),
    ("v1/completions", {"model": MODEL, "prompt": PROMPT, "max_tokens": 5000}, 400,
     "max_tokens", "context"),
    ("v1/completions", {"model": MODEL, "prompt": PROMPT, "n": 99}, 400, "n", "n must"),
    ("v1/completions", {"model": MODEL, "prompt": PROMPT, "seed": -1}, 400, "seed", "seed"),
    ("v1/completions", {"model": MODEL, "prompt": PROMPT, "steps": 0}, 400, "steps", "steps"),
    ("v1/completions", {"model": MODEL, "prompt": PROMPT, "guidance": 99}, 400, "guidance", ""),
    ("v1/completions", {"model": MODEL, "prompt": PROMPT, "sampler": "rk4"}, 400, "sampler", ""),
    ("v1/completions", {"model": MODEL, "prompt": PROMPT, "stop": ["."]}, 400, "stop",
     "not supported"),
    ("v1/completions", {"model": MODEL, "prompt": 3}, 422, "prompt", ""),
    ("v1/completions", {"model": MODEL, "prompt": PROMPT, "max_tokens": "many"}, 422,
     "max_tokens", ""),
    ("v1/completions", {"model": "gpt-4", "prompt": PROMPT}, 404, "model", "does not exist"),
    ("v1/chat/completions", {"model": MODEL}, 422, "messages", "required"),
    ("v1/chat/completions", {"model": MODEL, "messages": []}, 400, "messages", "empty"),
    ("v1/chat/completions", {"model": MODEL, "messages": [{"role": "robot", "content": "hi"}]},
     400, "messages[0].role", "role"),
    ("v1/chat/completions", _chat_image("https://example.com/cat.png"), 400,
     "messages[0].content[0]", "not fetched"),
    ("v1/chat/completions", _chat_image("data:image/png;base64,@@@"), 400,
     "messages[0].content[0]", "base64"),
    ("v1/chat/completions", _chat_image(_gif_url()), 400, "messages[0].content[0]",
     "only PNG and JPEG"),
    ("v1/chat/completions", _chat_image(png_data_url(Image.new("RGB", (5000, 4)))), 413,
     "messages[0].content[0]", "too large"),
    ("v1/images/generations", {"model": MODEL, "prompt": "a red circle", "size": "1024x1024"},
     400, "size", "32x32"),
    ("v1/images/generations", {"model": MODEL, "prompt": "a red circle", "size": "30x32"},
     400, "size", "size width must be a positive multiple of 8 pixels"),
    ("v1/images/generations", {"model": MODEL, "prompt": "a red circle", "size": "wide"},
     400, "size", "WIDTHxHEIGHT"),
    ("v1/images/generations", {"model": MODEL, "prompt": "a red circle",
                               "response_format": "url"}, 400, "response_format", "b64_json"),
    ("v1/images/generations", {"model": MODEL, "prompt": "  "}, 400, "prompt", "empty"),
    ("v1/no/such/route", {}, 404, None, "no such route"),
]


@pytest.mark.parametrize("path,body,status,param,words", BAD,
                         ids=[f"{i}-{b[0].split('/')[-1]}-{b[2]}" for i, b in enumerate(BAD)])
def test_bad_input_is_answered_in_the_openai_error_format(server, path, body, status, param,
                                                          words):
    assert_openai_error(post(server, path, body), status, param, words)


def test_malformed_and_oversized_bodies(server, client):
    r = httpx.post(server + "v1/completions", content=b"{not json", timeout=30,
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert_openai_error(r, 400, words="not valid JSON")
    big = post(server, "v1/completions", {"model": MODEL, "prompt": "x" * (1 << 21)})
    assert_openai_error(big, 413, words="too large")  # --max-body-mb 1
    with pytest.raises(openai.BadRequestError) as e:  # the client sees the message too
        client.images.generate(model=MODEL, prompt="a red circle", size="256x256")
    assert "32x32" in e.value.message
    assert client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4,
                                     extra_body=FAST).choices[0].text is not None


def _health(server) -> dict:
    return httpx.get(server + "health", timeout=10).json()


def _wait_for(server, cond, timeout=60.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        h = _health(server)
        if cond(h):
            return h
        time.sleep(0.1)
    raise AssertionError(f"the server did not get there: {h}")


def test_full_queue_429_disconnect_frees_and_waiting_requests_batch(server, client, pipe):
    """A long stream runs; four requests wait (the queue holds 4), a fifth gets 429. The long
    stream's client goes away mid-stream: its batch stops at the next block, and the four
    waiting requests run as ONE batch, each giving what it gives alone."""
    before = _health(server)
    long = {"model": MODEL, "prompt": PROMPT, "max_tokens": 112, "stream": True, "steps": 16,
            "seed": 4}  # 7 blocks: no early EOS
    with httpx.stream("POST", server + "v1/completions", json=long, timeout=120,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))  # the first block
        prompts = ["Return the number", "Open the file", "A list of", "The path"]
        results: dict[int, str] = {}

        def ask(i):
            results[i] = client.completions.create(model=MODEL, prompt=prompts[i], max_tokens=4,
                                                   seed=i, extra_body={"steps": 1}).choices[0].text

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        _wait_for(server, lambda h: h["waiting"] == 4)
        with pytest.raises(openai.RateLimitError) as e:
            client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, extra_body=FAST)
        assert e.value.status_code == 429 and "busy" in e.value.message
    # the stream's connection is closed here, mid-generation
    for t in threads:
        t.join(timeout=120)
    h = _wait_for(server, lambda h: h["running"] == 0 and h["waiting"] == 0)
    assert h["abandoned_batches"] == before["abandoned_batches"] + 1
    assert h["cancelled"] >= before["cancelled"] + 1
    assert h["largest_batch"] >= 4 and h["batches"] == before["batches"] + 2
    for i, p in enumerate(prompts):
        assert results[i] == pipe.generate_text(p, max_new_tokens=4, steps=1, seed=i).text
    assert client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4,
                                     extra_body=FAST).choices[0].text is not None


def test_a_request_joins_a_running_stream_mid_flight(server, client, pipe):
    """Continuous batching through the real server: a request sent while a stream runs (same
    knobs) joins its batch at the next block boundary (one batch, `joined` counted); both
    give exactly their solo text."""
    _wait_for(server, lambda h: h["running"] == 0 and h["waiting"] == 0)
    before = _health(server)
    knobs = {"steps": 8}
    stream = iter(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=112, seed=3,
                                            stream=True, extra_body=knobs))  # 7 blocks
    text = next(c for c in stream if c.choices and c.choices[0].text).choices[0].text
    late = client.completions.create(model=MODEL, prompt="Open the file", max_tokens=20,
                                     seed=1, extra_body=knobs).choices[0].text
    text += "".join(c.choices[0].text for c in stream if c.choices)
    h = _health(server)
    assert h["joined"] == before["joined"] + 1 and h["batches"] == before["batches"] + 1
    assert late == pipe.generate_text("Open the file", max_new_tokens=20, steps=8, seed=1).text
    assert text == pipe.generate_text(PROMPT, max_new_tokens=112, steps=8, seed=3).text


@pytest.mark.parametrize("flag,value", [("--port", "70000"), ("--max-batch", "0"),
                                        ("--max-queue", "0"), ("--timeout", "0")])
def test_serve_bad_settings_fail_before_the_model_loads(capsys, flag, value):
    from unified.apps.cli import main

    assert main(["serve", flag, value, "--checkpoint", "/no/such/model"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cola serve: error: ") and flag in err and "Traceback" not in err


def test_serve_refuses_a_busy_port(capsys):
    import socket

    from unified.apps.cli import main

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert main(["serve", "--port", str(port), "--checkpoint", "/no/such/model"]) == 2
    assert f"cannot serve on 127.0.0.1:{port}" in capsys.readouterr().err
