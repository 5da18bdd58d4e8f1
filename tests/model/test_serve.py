"""`kiln serve-model`, driven by the official `openai` client: models, chat and text completions,
streamed and not, stop strings, max_tokens, and requests at once that are never interleaved."""

import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from model.chat import ChatSession, load_for_generation
from model.generate import SamplingConfig, generate_tokens
from model.serve import until_stop
from tests.prefect_servers import free_port, stop

ROOT = Path(__file__).resolve().parents[2]
openai = pytest.importorskip("openai")


def test_stop_strings_cut_the_text_even_across_pieces():
    assert "".join(until_stop(iter(["ab", "c<", "|e", "nd|>tail"]), ["<|end|>"])) == "abc"
    assert "".join(until_stop(iter(["a<", "b"]), ["<|end|>"])) == "a<b", "a held-back prefix is released"
    assert "".join(until_stop(iter(["xySTOPz"]), ["z", "STOP"])) == "xy", "the earliest stop wins"
    assert "".join(until_stop(iter(["ab"]), [])) == "ab"


@pytest.fixture(scope="module")
def served(trained, tmp_path_factory):
    """`kiln serve-model` on a small trained model, and an OpenAI client pointed at it."""
    store, artifact, _, _ = trained
    model_dir = store.local_path(artifact, "model")
    port = free_port()
    log = open(tmp_path_factory.mktemp("serve-log") / "server.log", "w+")
    server = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve-model", str(model_dir), "--port", str(port),
                               "--name", "kiln-test"], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True, env=dict(os.environ))
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=60)
    deadline = time.time() + 90
    while True:
        try:
            client.models.list()
            break
        except openai.APIConnectionError:
            assert server.poll() is None and time.time() < deadline, log.seek(0) or log.read()[-3000:]
            time.sleep(0.3)
    yield client, load_for_generation(model_dir)
    stop(server)
    log.close()


def greedy_text(loaded, prompt_ids, max_tokens, stop_ids):
    tokens = list(generate_tokens(loaded.model, prompt_ids, SamplingConfig(max_new_tokens=max_tokens, temperature=0),
                                  stop_ids))
    return loaded.tokenizer.decode(tokens, skip_special_tokens=False), len(tokens)


def test_models_and_a_greedy_completion_are_the_model_s_own(served):
    client, loaded = served
    assert [m.id for m in client.models.list().data] == ["kiln-test"]
    done = client.completions.create(model="kiln-test", prompt="The module", max_tokens=12, temperature=0)
    expected, n = greedy_text(loaded, loaded.encode_document_start("The module"), 12, {loaded.token_id("<|bos|>")})
    assert done.choices[0].text == expected and done.usage.completion_tokens == n
    assert done.choices[0].finish_reason == ("length" if n == 12 else "stop")
    assert done.usage.prompt_tokens == len(loaded.encode_document_start("The module"))


def test_a_streamed_chat_answer_is_kiln_chat_s_greedy_answer_and_stop_cuts_it(served):
    client, loaded = served
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What does json.dumps do?"}]
    stream = client.chat.completions.create(model="kiln-test", messages=messages, max_tokens=20, temperature=0,
                                            stream=True)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    session = ChatSession(loaded, SamplingConfig(max_new_tokens=20, temperature=0), system="Be brief.")
    assert text == "".join(session.reply("What does json.dumps do?")), "what `kiln chat` answers"
    assert chunks[-1].choices[0].finish_reason in ("stop", "length") and chunks[0].choices[0].delta.role == "assistant"
    assert len(text) > 4, text
    whole = client.chat.completions.create(model="kiln-test", messages=messages, max_tokens=20, temperature=0)
    assert whole.choices[0].message.content == text and whole.choices[0].message.role == "assistant"
    assert whole.object == "chat.completion"
    cut = text[len(text) // 2:len(text) // 2 + 2]
    stopped = client.chat.completions.create(model="kiln-test", messages=messages, max_tokens=20, temperature=0,
                                             stop=[cut])
    assert stopped.choices[0].message.content == text[:text.find(cut)]
    assert stopped.choices[0].finish_reason == "stop"


def test_eight_requests_at_once_are_queued_not_interleaved(served):
    client, _ = served

    def ask(i):
        if i % 2:
            return client.chat.completions.create(model="kiln-test", messages=[{"role": "user", "content": f"Item {i}?"}],
                                                  max_tokens=12, temperature=0.9, top_p=0.9, seed=i,
                                                  stream=True)
        return client.completions.create(model="kiln-test", prompt=f"Section {i}", max_tokens=16, temperature=0.9,
                                         top_p=0.9, seed=i).choices[0].text

    def text(answer):
        return answer if isinstance(answer, str) else "".join(c.choices[0].delta.content or "" for c in answer)

    alone = [text(ask(i)) for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda i: text(ask(i)), range(8)))
    assert together == alone, "each request has its own cache and its own seeded sampler"
    assert len(set(alone)) == 8, alone


def test_malformed_requests_get_a_4xx_with_a_json_error(served):
    client, _ = served
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model="kiln-test", prompt="word " * 400, max_tokens=2)
    with pytest.raises(openai.UnprocessableEntityError):
        client.chat.completions.create(model="kiln-test", messages=[{"role": "wizard", "content": "x"}])
    import httpx

    base = str(client.base_url).rstrip("/")
    bodies = ["{not json", "[]", "null", '{"messages": []}', '{"messages": "hi"}', '{"prompt": 5}',
              '{"prompt": "x", "max_tokens": -1}', '{"prompt": "x", "temperature": 9}', '{"prompt": "x", "top_p": 0}',
              '{"prompt": "x", "n": 3}', '{"prompt": "x", "stop": 7}', '{"prompt": "x", "seed": "a"}']
    for endpoint in ("completions", "chat/completions"):
        for body in bodies:
            reply = httpx.post(f"{base}/{endpoint}", content=body, headers={"content-type": "application/json"})
            assert 400 <= reply.status_code < 500, (endpoint, body, reply.status_code, reply.text)
            assert isinstance(reply.json(), dict), (endpoint, body, reply.text)
    assert httpx.get(f"{base}/nothing").status_code == 404
    assert httpx.get(f"{base}/completions").status_code == 405
