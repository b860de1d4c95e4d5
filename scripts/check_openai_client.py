#!/usr/bin/env python3
"""Checks tinygpt's OpenAI-compatible server with the official `openai` Python client.

    python scripts/check_openai_client.py --base-url http://127.0.0.1:PORT/v1 [--api-key K]

Needs `pip install openai` and `curl` on PATH. Prints one line per check (PASS, FAIL or SKIP)
and exits 0 only when none failed.

On a chat model (an SFT checkpoint) it checks the chat API; on a plain model, where the server
refuses chat with a 400, the completions API instead. Either way: a seeded non-streaming
request, the same request streamed (the joined deltas must equal the non-streamed text exactly,
and `stream_options.include_usage` must give the same usage), the model list, a request the
server must refuse (temperature 5 -> `openai.BadRequestError`), an unknown model
(`openai.NotFoundError`), and a raw `curl -N` stream whose `data:` lines are JSON chunks ending
with `data: [DONE]`. With --api-key it also checks that a wrong key gets
`openai.AuthenticationError`.
"""

import argparse
import json
import re
import subprocess
import sys
import threading
import traceback

try:
    import openai
except ImportError:  # pragma: no cover
    print("FAIL import openai: the `openai` package is not installed (pip install openai)")
    sys.exit(2)

SEED = 7
TEMPERATURE = 0.8
MAX_TOKENS = 32
MESSAGES = [{"role": "user", "content": "Who are you?"}]
PROMPT = "ROMEO:"
ERROR_KEYS = ("message", "type", "param", "code")


class Checks:
    def __init__(self):
        self.passed = 0
        self.failed = 0
        self.skipped = 0

    def run(self, name, fn):
        """Runs `fn()`; it returns a detail string (PASS), raises AssertionError (FAIL), or
        returns ("skip", why)."""
        try:
            detail = fn()
        except AssertionError as e:
            self.failed += 1
            print(f"FAIL {name}: {e}", flush=True)
            return False
        except Exception as e:  # noqa: BLE001 - any other exception is a failure too
            self.failed += 1
            print(f"FAIL {name}: unexpected {type(e).__name__}: {e}", flush=True)
            traceback.print_exc(limit=3, file=sys.stdout)
            return False
        if isinstance(detail, tuple) and detail and detail[0] == "skip":
            self.skipped += 1
            print(f"SKIP {name}: {detail[1]}", flush=True)
            return None
        self.passed += 1
        print(f"PASS {name}" + (f": {detail}" if detail else ""), flush=True)
        return True


CONTEXT = {"tokens": None}  # the model's max_model_len, where /v1/models tells it


def check_usage(usage, max_tokens, finish_reason):
    assert usage is not None, "no usage in the response"
    for k in ("prompt_tokens", "completion_tokens", "total_tokens"):
        v = getattr(usage, k, None)
        assert isinstance(v, int) and not isinstance(v, bool), f"usage.{k} = {v!r} is not an int"
    assert usage.prompt_tokens > 0, f"usage.prompt_tokens = {usage.prompt_tokens}, expected > 0"
    assert usage.prompt_tokens + usage.completion_tokens == usage.total_tokens, (
        f"usage does not add up: {usage.prompt_tokens} + {usage.completion_tokens} "
        f"!= {usage.total_tokens}")
    assert 0 <= usage.completion_tokens <= max_tokens, (
        f"usage.completion_tokens = {usage.completion_tokens} outside 0..={max_tokens}")
    if finish_reason == "length":
        full = CONTEXT["tokens"] is not None and usage.total_tokens == CONTEXT["tokens"]
        assert usage.completion_tokens == max_tokens or full, (
            f"finish_reason 'length' but completion_tokens = {usage.completion_tokens}, "
            f"expected max_tokens = {max_tokens} (or a full context)")


def usage_tuple(u):
    return (u.prompt_tokens, u.completion_tokens, u.total_tokens)


def check_error_body(e, status):
    assert e.status_code == status, f"status {e.status_code}, expected {status}"
    body = e.body
    assert isinstance(body, dict), (
        f"error body is not a JSON object with an `error` object: {e.response.text[:300]!r}")
    missing = [k for k in ERROR_KEYS if k not in body]
    assert not missing, f"error object lacks {missing}: {body}"
    assert isinstance(body.get("message"), str) and body["message"], f"empty message: {body}"
    return f"{status} {body.get('type')}: {body.get('message')[:100]}"


def curl_stream(base_url, api_key, path, payload):
    """Streams `payload` with `curl -N` and checks every line of the raw SSE output."""
    cmd = ["curl", "-sS", "-N", "--max-time", "120", "-H", "Content-Type: application/json",
           "-w", "\n%{http_code}"]
    if api_key:
        cmd += ["-H", f"Authorization: Bearer {api_key}"]
    cmd += ["--data-binary", "@-", base_url.rstrip("/") + path]
    p = subprocess.run(cmd, input=json.dumps(payload).encode(), capture_output=True, timeout=150)
    assert p.returncode == 0, f"curl exited {p.returncode}: {p.stderr.decode(errors='replace')}"
    out = p.stdout.decode("utf-8", errors="strict")
    out, _, code = out.rpartition("\n")
    assert code == "200", f"HTTP {code}: {out[:300]!r}"
    lines = [ln for ln in out.split("\n")]
    # SSE: events separated by blank lines; `\r\n` line ends are allowed too.
    lines = [ln.rstrip("\r") for ln in lines]
    nonblank = [ln for ln in lines if ln.strip()]
    assert nonblank, "empty stream"
    assert nonblank[-1] == "data: [DONE]", f"last line is {nonblank[-1]!r}, not 'data: [DONE]'"
    chunks = []
    for ln in nonblank[:-1]:
        if ln.startswith(":"):  # an SSE comment (keep-alive)
            continue
        assert ln.startswith("data: "), f"line is not a `data: ` line: {ln[:200]!r}"
        try:
            obj = json.loads(ln[len("data: "):])
        except json.JSONDecodeError as e:
            raise AssertionError(f"data line is not JSON ({e}): {ln[:200]!r}")
        assert isinstance(obj, dict), f"data line is not a JSON object: {ln[:200]!r}"
        missing = [k for k in ("id", "object", "created", "model", "choices") if k not in obj]
        assert not missing, f"chunk lacks {missing}: {ln[:300]!r}"
        assert isinstance(obj["choices"], list), f"choices is not a list: {ln[:300]!r}"
        chunks.append(obj)
    assert [ln for ln in nonblank if ln == "data: [DONE]"] == ["data: [DONE]"], \
        "more than one [DONE]"
    assert chunks, "no chunk before [DONE]"
    ids = {c["id"] for c in chunks}
    assert len(ids) == 1, f"chunks carry different ids: {sorted(ids)[:4]}"
    return chunks


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:8080/v1")
    ap.add_argument("--api-key", default=None, help="the server's --api-key, if it has one")
    ap.add_argument("--model", default=None, help="model id (default: the first listed)")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    args = ap.parse_args()

    base_url = args.base_url.rstrip("/")
    client = openai.OpenAI(base_url=base_url, api_key=args.api_key or "sk-no-key",
                           max_retries=0, timeout=args.timeout)
    checks = Checks()
    state = {"model": args.model, "mode": None}

    # --- models ------------------------------------------------------------------------------
    def models_list():
        page = client.models.list()
        ids = [m.id for m in page.data]
        assert ids, "the model list is empty"
        for m in page.data:
            assert getattr(m, "object", None) == "model", f"model object is {m.object!r}"
        if state["model"] is None:
            state["model"] = ids[0]
        for m in page.data:
            if m.id == state["model"]:
                CONTEXT["tokens"] = getattr(m, "max_model_len", None)
        assert state["model"] in ids, f"{state['model']!r} not in {ids}"
        return f"{ids}"

    if not checks.run("models.list() has the model", models_list):
        if state["model"] is None:
            print("FAIL cannot go on without a model id")
            print(f"{checks.passed} passed, {checks.failed} failed, {checks.skipped} skipped")
            return 1
    model = state["model"]

    # --- chat or plain? ----------------------------------------------------------------------
    ref = {}

    def chat_create():
        try:
            r = client.chat.completions.create(model=model, messages=MESSAGES, seed=SEED,
                                               temperature=TEMPERATURE, max_tokens=MAX_TOKENS)
        except openai.BadRequestError as e:
            msg = str(getattr(e, "message", e))
            if "chat" in msg.lower():
                state["mode"] = "plain"
                detail = check_error_body(e, 400)
                return f"the server refuses chat on this model ({detail}); checking completions"
            raise
        state["mode"] = "chat"
        assert r.object == "chat.completion", f"object = {r.object!r}"
        assert isinstance(r.id, str) and r.id, f"id = {r.id!r}"
        assert isinstance(r.created, int), f"created = {r.created!r}"
        assert r.model == model, f"model = {r.model!r}, expected {model!r}"
        assert len(r.choices) == 1, f"{len(r.choices)} choices"
        c = r.choices[0]
        assert c.index == 0, f"index = {c.index}"
        assert c.message.role == "assistant", f"role = {c.message.role!r}"
        assert isinstance(c.message.content, str), f"content = {c.message.content!r}"
        assert c.finish_reason in ("stop", "length"), f"finish_reason = {c.finish_reason!r}"
        check_usage(r.usage, MAX_TOKENS, c.finish_reason)
        ref.update(text=c.message.content, finish=c.finish_reason, usage=usage_tuple(r.usage))
        return (f"{c.finish_reason}, usage {usage_tuple(r.usage)}, "
                f"text {c.message.content[:60]!r}")

    checks.run("chat.completions.create (non-streaming)", chat_create)

    if state["mode"] == "chat":
        def chat_repeat():
            assert ref, "no reference reply (the non-streaming check failed)"
            r = client.chat.completions.create(model=model, messages=MESSAGES, seed=SEED,
                                               temperature=TEMPERATURE, max_tokens=MAX_TOKENS)
            assert r.choices[0].message.content == ref["text"], (
                f"same seed, different text: {r.choices[0].message.content!r} vs {ref['text']!r}")
            return "identical text"

        checks.run("chat: same seed twice gives the same reply", chat_repeat)

        def chat_stream():
            assert ref, "no reference reply (the non-streaming check failed)"
            stream = client.chat.completions.create(
                model=model, messages=MESSAGES, seed=SEED, temperature=TEMPERATURE,
                max_tokens=MAX_TOKENS, stream=True, stream_options={"include_usage": True})
            parts, finish, usage, n, ids, roles = [], None, None, 0, set(), []
            usage_seen_at = None
            for chunk in stream:
                n += 1
                assert chunk.object == "chat.completion.chunk", f"object = {chunk.object!r}"
                assert chunk.model == model, f"chunk model = {chunk.model!r}"
                ids.add(chunk.id)
                if chunk.usage is not None:
                    assert usage is None, "two usage chunks"
                    usage, usage_seen_at = chunk.usage, n
                    assert chunk.choices == [], (
                        f"the usage chunk has choices {chunk.choices!r} (OpenAI sends [])")
                for ch in chunk.choices:
                    assert usage is None, "a choice chunk after the usage chunk"
                    assert ch.index == 0, f"choice index {ch.index}"
                    if ch.delta.role is not None:
                        roles.append(ch.delta.role)
                    if ch.delta.content is not None:
                        assert isinstance(ch.delta.content, str)
                        parts.append(ch.delta.content)
                    if ch.finish_reason is not None:
                        assert finish is None, "two finish_reasons"
                        finish = ch.finish_reason
            text = "".join(parts)
            assert len(ids) == 1, f"chunks carry different ids: {ids}"
            assert roles[:1] == ["assistant"], f"delta roles {roles}, expected 'assistant' first"
            assert finish == ref["finish"], f"finish_reason {finish!r} vs {ref['finish']!r}"
            assert text == ref["text"], (
                f"streamed text differs from the non-streamed one:\n  stream: {text!r}\n"
                f"  non-stream: {ref['text']!r}")
            assert usage is not None, "no usage chunk with stream_options.include_usage"
            assert usage_seen_at == n, "the usage chunk is not the last chunk"
            assert usage_tuple(usage) == ref["usage"], (
                f"stream usage {usage_tuple(usage)} != non-stream usage {ref['usage']}")
            return f"{n} chunks, text and usage {usage_tuple(usage)} identical"

        checks.run("chat: streaming deltas == non-streaming text, usage chunk", chat_stream)

        def chat_stream_no_usage():
            stream = client.chat.completions.create(
                model=model, messages=MESSAGES, seed=SEED, temperature=TEMPERATURE,
                max_tokens=4, stream=True)
            usages = [c.usage for c in stream if c.usage is not None]
            assert not usages, f"a usage chunk without stream_options.include_usage: {usages}"
            return "no usage chunk"

        checks.run("chat: no usage chunk unless asked for", chat_stream_no_usage)

        def chat_bad_temperature():
            try:
                client.chat.completions.create(model=model, messages=MESSAGES, temperature=5,
                                               max_tokens=4)
            except openai.BadRequestError as e:
                return check_error_body(e, 400)
            raise AssertionError("temperature=5 was accepted")

        checks.run("chat: temperature=5 raises BadRequestError", chat_bad_temperature)

        def chat_unknown_model():
            try:
                client.chat.completions.create(model="no-such-model-xyz", messages=MESSAGES,
                                               max_tokens=4)
            except openai.NotFoundError as e:
                return check_error_body(e, 404)
            raise AssertionError("an unknown model was accepted")

        checks.run("chat: unknown model raises NotFoundError", chat_unknown_model)

        checks.run("completions.create on a plain model",
                   lambda: ("skip", "this is a chat model (the server takes chat)"))

        def curl_chat():
            chunks = curl_stream(base_url, args.api_key, "/chat/completions", {
                "model": model, "messages": MESSAGES, "seed": SEED, "temperature": TEMPERATURE,
                "max_tokens": MAX_TOKENS, "stream": True})
            for c in chunks:
                assert c["object"] == "chat.completion.chunk", f"object = {c['object']!r}"
            text = "".join((ch.get("delta") or {}).get("content") or ""
                           for c in chunks for ch in c["choices"])
            if ref:
                assert text == ref["text"], f"curl text {text!r} != {ref['text']!r}"
            return f"{len(chunks)} data lines + [DONE]"

        checks.run("curl -N chat stream: data: JSON lines ending in data: [DONE]", curl_chat)

    elif state["mode"] == "plain":
        def comp_create():
            r = client.completions.create(model=model, prompt=PROMPT, seed=SEED,
                                          temperature=TEMPERATURE, max_tokens=MAX_TOKENS)
            assert r.object == "text_completion", f"object = {r.object!r}"
            assert isinstance(r.id, str) and r.id, f"id = {r.id!r}"
            assert r.model == model, f"model = {r.model!r}"
            assert len(r.choices) == 1, f"{len(r.choices)} choices"
            c = r.choices[0]
            assert isinstance(c.text, str), f"text = {c.text!r}"
            assert c.finish_reason in ("stop", "length"), f"finish_reason = {c.finish_reason!r}"
            check_usage(r.usage, MAX_TOKENS, c.finish_reason)
            ref.update(text=c.text, finish=c.finish_reason, usage=usage_tuple(r.usage))
            return f"{c.finish_reason}, usage {usage_tuple(r.usage)}, text {c.text[:60]!r}"

        checks.run("completions.create (non-streaming)", comp_create)

        def comp_stream():
            assert ref, "no reference reply (the non-streaming check failed)"
            stream = client.completions.create(
                model=model, prompt=PROMPT, seed=SEED, temperature=TEMPERATURE,
                max_tokens=MAX_TOKENS, stream=True, stream_options={"include_usage": True})
            parts, finish, usage, n = [], None, None, 0
            for chunk in stream:
                n += 1
                assert chunk.object == "text_completion", f"object = {chunk.object!r}"
                if chunk.usage is not None:
                    assert usage is None, "two usage chunks"
                    usage = chunk.usage
                for ch in chunk.choices:
                    parts.append(ch.text or "")
                    if ch.finish_reason is not None:
                        finish = ch.finish_reason
            text = "".join(parts)
            assert finish == ref["finish"], f"finish_reason {finish!r} vs {ref['finish']!r}"
            assert text == ref["text"], (
                f"streamed text differs:\n  stream: {text!r}\n  non-stream: {ref['text']!r}")
            assert usage is not None, "no usage chunk with stream_options.include_usage"
            assert usage_tuple(usage) == ref["usage"], (
                f"stream usage {usage_tuple(usage)} != non-stream usage {ref['usage']}")
            return f"{n} chunks, text and usage identical"

        checks.run("completions: streaming text == non-streaming text, usage chunk", comp_stream)

        def comp_bad_temperature():
            try:
                client.completions.create(model=model, prompt=PROMPT, temperature=5,
                                          max_tokens=4)
            except openai.BadRequestError as e:
                return check_error_body(e, 400)
            raise AssertionError("temperature=5 was accepted")

        checks.run("completions: temperature=5 raises BadRequestError", comp_bad_temperature)

        def comp_unknown_model():
            try:
                client.completions.create(model="no-such-model-xyz", prompt=PROMPT, max_tokens=4)
            except openai.NotFoundError as e:
                return check_error_body(e, 404)
            raise AssertionError("an unknown model was accepted")

        checks.run("completions: unknown model raises NotFoundError", comp_unknown_model)

        def curl_comp():
            chunks = curl_stream(base_url, args.api_key, "/completions", {
                "model": model, "prompt": PROMPT, "seed": SEED, "temperature": TEMPERATURE,
                "max_tokens": MAX_TOKENS, "stream": True})
            text = "".join(ch.get("text") or "" for c in chunks for ch in c["choices"])
            if ref:
                assert text == ref["text"], f"curl text {text!r} != {ref['text']!r}"
            return f"{len(chunks)} data lines + [DONE]"

        checks.run("curl -N completions stream: data: JSON lines ending in data: [DONE]",
                   curl_comp)
    else:
        print("FAIL the first request failed, so the chat/plain checks cannot run")
        checks.failed += 1

    # --- checks for both modes: stop strings, greedy decoding, batching ----------------------
    def generate(stream, **kw):
        """(text, finish_reason, usage tuple or None) of one request in the current mode."""
        params = dict(model=model, max_tokens=MAX_TOKENS, seed=SEED, temperature=TEMPERATURE)
        params.update(kw)
        if state["mode"] == "chat":
            call, params["messages"] = client.chat.completions.create, MESSAGES
        else:
            call, params["prompt"] = client.completions.create, PROMPT
        if not stream:
            r = call(**params)
            c = r.choices[0]
            text = c.message.content if state["mode"] == "chat" else c.text
            return text, c.finish_reason, usage_tuple(r.usage)
        parts, finish, usage = [], None, None
        for chunk in call(stream=True, stream_options={"include_usage": True}, **params):
            if chunk.usage is not None:
                usage = usage_tuple(chunk.usage)
            for ch in chunk.choices:
                piece = ch.delta.content if state["mode"] == "chat" else ch.text
                parts.append(piece or "")
                finish = ch.finish_reason or finish
        return "".join(parts), finish, usage

    def stop_string():
        assert ref, "no reference reply (the non-streaming check failed)"
        # A stop string from the middle of the reference reply: the same seed must give the
        # reference text cut just before its first occurrence.
        words = [m for m in re.finditer(r"[A-Za-z]{2,4}", ref["text"]) if m.start() >= 3]
        if not words:
            return ("skip", f"no ASCII word in the reference reply {ref['text']!r}")
        stop = words[0].group()
        want = ref["text"][:ref["text"].index(stop)]
        got = {}
        for stream in (False, True):
            text, finish, _ = generate(stream, stop=[stop, "\u0000never"])
            what = "stream" if stream else "non-stream"
            assert text == want, (f"{what} with stop={stop!r}: {text!r}, expected {want!r} "
                                  f"(the reference {ref['text']!r} cut before the stop)")
            assert finish == "stop", f"{what}: finish_reason {finish!r}, expected 'stop'"
            got[what] = text
        return f"stop={stop!r}: {want!r} both ways"

    checks.run(f"{state['mode']}: a stop string cuts the same reply (stream and not)",
               stop_string)

    def greedy():
        a = generate(False, temperature=0, seed=1)
        b = generate(False, temperature=0, seed=2)
        c = generate(True, temperature=0, seed=3)
        assert a[0] == b[0] == c[0], f"temperature 0 depends on the seed: {a[0]!r} {b[0]!r} {c[0]!r}"
        return f"{a[0][:50]!r}"

    checks.run(f"{state['mode']}: temperature 0 ignores the seed", greedy)

    def batched():
        # Requests decoded together must give the tokens each gives alone (the engine's
        # batching is row-wise).
        n = 6
        alone = [generate(i % 2 == 1, seed=100 + i) for i in range(n)]
        together = [None] * n
        errors = []
        barrier = threading.Barrier(n)

        def one(i):
            try:
                barrier.wait()
                together[i] = generate(i % 2 == 0, seed=100 + i)
            except Exception as e:  # noqa: BLE001
                errors.append(f"request {i}: {type(e).__name__}: {e}")

        threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, "; ".join(errors)
        diff = [i for i in range(n) if alone[i][:2] != together[i][:2]]
        assert not diff, "replies differ when batched: " + "; ".join(
            f"seed {100 + i}: alone {alone[i][0]!r} vs together {together[i][0]!r}"
            for i in diff[:3])
        return f"{n} concurrent requests (mixed stream/non-stream) == one by one"

    checks.run(f"{state['mode']}: concurrent requests give the replies they give alone",
               batched)

    if args.api_key:
        def wrong_key():
            bad = openai.OpenAI(base_url=base_url, api_key=args.api_key + "-wrong",
                                max_retries=0, timeout=args.timeout)
            try:
                if state["mode"] == "plain":
                    bad.completions.create(model=model, prompt=PROMPT, max_tokens=1)
                else:
                    bad.chat.completions.create(model=model, messages=MESSAGES, max_tokens=1)
            except openai.AuthenticationError as e:
                return check_error_body(e, 401)
            raise AssertionError("a wrong API key was accepted")

        checks.run("a wrong API key raises AuthenticationError", wrong_key)

    print(f"{checks.passed} passed, {checks.failed} failed, {checks.skipped} skipped")
    return 0 if checks.failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
