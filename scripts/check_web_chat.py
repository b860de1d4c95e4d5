#!/usr/bin/env python3
"""End-to-end check of the tinygpt web chat (`GET /` of the `server` feature) in headless Chromium.

Usage, with the server running (e.g. `cargo run --release --features server --example serve --
--ckpt target/ci/sft --port 19000`, which prints `listening on http://ADDR`):

    python scripts/check_web_chat.py --url http://127.0.0.1:19000 --screenshot target/ci/web_chat.png

or letting the script start the built server on a free port and stop it after:

    python scripts/check_web_chat.py --ckpt target/ci/sft --screenshot target/ci/web_chat.png

Needs PyPI `selenium` (it brings `websocket-client`) and Debian's `chromium` and `chromium-driver`
(/usr/bin/chromium, /usr/bin/chromedriver):

    apt-get install -y chromium chromium-driver
    python3 -m venv /work/venv && /work/venv/bin/pip install selenium

Nothing is downloaded while it runs: the driver's path is given, so Selenium Manager never runs, and
Chromium starts with a fresh profile and its background networking off. A server started with an
API key needs `--api-key` (or the environment variable TINYGPT_API_KEY).

Against the real server: a streamed reply (its length must be seen growing), Shift+Enter and Enter,
a long reply stopped with the Stop button (marked stopped, no longer growing, shorter than
max_tokens), a follow-up after the abort, a conversation that outgrows the model's context (the
page leaves the oldest turns out) and a message too long for it (the error is shown). A tiny model
on a CPU streams a whole reply in milliseconds, so the browser's downloads of those replies are
throttled (`--throttle`, DevTools network emulation) to let a person, or this script, watch and
stop them. Then, answering /v1/chat/completions itself through the DevTools protocol's Fetch domain
(falling back to overriding `window.fetch`): HTML in a reply must show as text with no element or
script run, and an HTTP error and an in-stream `event: error` must be shown. Last: no CSP
violations, only same-origin requests, no console errors, and a 390 px wide window without
horizontal overflow. Screenshots: `--screenshot` after the conversation, and `<name>_narrow.png`.

One line per check (PASS/FAIL, INFO for notes); exit status 0 only if all passed.
"""

import argparse
import base64
import json
import os
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

CSP_EXPECTED = ("default-src 'self'", "script-src 'self' 'unsafe-inline'", "style-src 'self' 'unsafe-inline'")
XSS_PIECES = ["<img src=x onerror=alert(1)>", " and ", "<b>bold</b>", " & <script>window.__xss=2</script>",
              " <img src=x onerror=\"window.__xss=3\">"]
XSS_TEXT = "".join(XSS_PIECES)

# Runs before the page's own scripts: records CSP violations and any alert() a payload might fire.
INIT_SCRIPT = r"""
window.__xss = 0;
window.__csp = [];
window.__alerts = [];
window.alert = function (m) { window.__xss = 1; window.__alerts.push(String(m)); };
document.addEventListener('securitypolicyviolation', function (e) {
  window.__csp.push(e.violatedDirective + ' ' + e.blockedURI);
});
"""

# An in-page sampler of the last assistant reply's length while streaming (every 10 ms).
SAMPLER_START = r"""
if (window.__sampler) clearInterval(window.__sampler);
window.__samples = [];
window.__sampler = setInterval(function () {
  var c = document.querySelectorAll('#messages .message.assistant .content');
  var last = c.length ? c[c.length - 1] : null;
  window.__samples.push([document.body.getAttribute('data-state'), last ? last.textContent.length : -1]);
}, 10);
"""
SAMPLER_STOP = "clearInterval(window.__sampler); window.__sampler = null; return window.__samples;"

results = []


def report(ok, name, detail=""):
    results.append((ok, name))
    print(("PASS" if ok else "FAIL") + "  " + name + (": " + detail if detail else ""), flush=True)
    return ok


def info(name, detail):
    print("INFO  " + name + ": " + detail, flush=True)


def http_get(url, api_key=None, timeout=30):
    req = urllib.request.Request(url)
    if api_key:
        req.add_header("Authorization", "Bearer " + api_key)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers.items()), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers.items()), e.read()


def sse_body(pieces, error=None, finish="stop"):
    """An OpenAI chat.completion.chunk stream of `pieces`, ending in [DONE] or an `event: error`."""
    base = {"id": "chatcmpl-inject", "object": "chat.completion.chunk", "created": 0, "model": "inject"}
    out = ["data: " + json.dumps({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                       "finish_reason": None}]})]
    for p in pieces:
        out.append("data: " + json.dumps({**base, "choices": [{"index": 0, "delta": {"content": p},
                                                               "finish_reason": None}]}))
    if error:
        out.append("event: error\ndata: " + json.dumps({"error": {"message": error, "type": "server_error",
                                                                  "param": None, "code": None}}))
    else:
        out.append("data: " + json.dumps({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]}))
        out.append("data: [DONE]")
    return "\n\n".join(out) + "\n\n"


class Cdp:
    """A minimal client of the page's DevTools websocket (a second client next to chromedriver)."""

    def __init__(self, ws_url):
        import websocket  # from websocket-client, a dependency of selenium

        self.ws = websocket.create_connection(ws_url, timeout=10, suppress_origin=True)
        self.next_id = 0
        self.events = []
        self.lock = threading.Lock()

    def _recv(self, timeout):
        self.ws.settimeout(timeout)
        return json.loads(self.ws.recv())

    def call(self, method, params=None, timeout=10):
        self.next_id += 1
        mid = self.next_id
        self.ws.send(json.dumps({"id": mid, "method": method, "params": params or {}}))
        end = time.time() + timeout
        while time.time() < end:
            msg = self._recv(max(0.05, end - time.time()))
            if msg.get("id") == mid:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            if "method" in msg:
                self.events.append(msg)
        raise TimeoutError(method)

    def wait_event(self, method, timeout):
        end = time.time() + timeout
        while True:
            for i, e in enumerate(self.events):
                if e["method"] == method:
                    return self.events.pop(i)
            if time.time() >= end:
                raise TimeoutError("no " + method)
            try:
                msg = self._recv(max(0.05, end - time.time()))
            except Exception:  # websocket timeout
                continue
            if "method" in msg:
                self.events.append(msg)

    def close(self):
        try:
            self.ws.close()
        except Exception:
            pass


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="a running server, e.g. http://127.0.0.1:8000")
    where.add_argument("--ckpt", help="start the server on this chat checkpoint for the checks (stopped after)")
    ap.add_argument("--serve-bin", default="target/release/examples/serve",
                    help="the server binary for --ckpt (build: cargo build --release --features server "
                         "--example serve)")
    ap.add_argument("--serve-port", type=int, default=0, help="its port for --ckpt (0: any free one)")
    ap.add_argument("--serve-arg", action="append", default=[], metavar="ARG",
                    help="one more argument for the server (repeatable)")
    ap.add_argument("--screenshot", default="target/ci/web_chat.png", help="PNG of the conversation")
    ap.add_argument("--narrow-screenshot", default=None,
                    help="PNG of a phone-sized window (default: <screenshot>_narrow.png)")
    ap.add_argument("--api-key", default=os.environ.get("TINYGPT_API_KEY"), help="Bearer token, if needed")
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    ap.add_argument("--chromedriver", default="/usr/bin/chromedriver")
    ap.add_argument("--timeout", type=float, default=180, help="seconds to wait for one reply")
    ap.add_argument("--max-tokens", type=int, default=48, help="max tokens of the first reply")
    ap.add_argument("--temperature", default="1.2",
                    help="temperature of the first reply (a tiny model at 0.8 often ends in a few tokens)")
    ap.add_argument("--stop-max-tokens", type=int, default=400, help="max tokens of the reply that gets stopped")
    ap.add_argument("--throttle", type=int, default=3000, metavar="BYTES_PER_S",
                    help="slow the browser's downloads of the real replies to this rate (DevTools network "
                         "emulation), so a fast model's stream can be watched and stopped; 0: off")
    ap.add_argument("--no-csp-check", action="store_true", help="don't require the CSP header on /")
    ap.add_argument("--show", action="store_true", help="run Chromium with a window (debugging)")
    args = ap.parse_args()
    if not args.ckpt:
        return run(args)
    server = start_server(args)
    if server is None:
        return 1
    proc, args.url = server
    try:
        return run(args)
    finally:
        stop_server(proc)


def start_server(args):
    """Starts `serve --ckpt`; returns (process, its URL) once it prints `listening on http://ADDR`."""
    import re
    import subprocess

    cmd = [args.serve_bin, "--ckpt", args.ckpt, "--host", "127.0.0.1", "--port", str(args.serve_port)]
    cmd += ["--api-key", args.api_key] if args.api_key else []
    cmd += args.serve_arg
    if not os.access(args.serve_bin, os.X_OK):
        report(False, "start the server", f"{args.serve_bin} is missing (cargo build --release --features server "
                                          "--example serve)")
        return None
    shown = [c if c != args.api_key else "***" for c in cmd]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    found, lines = [], []

    def reader():
        for line in proc.stdout:
            lines.append(line.rstrip())
            m = re.search(r"listening on (http://\S+)", line)
            if m and not found:
                found.append(m.group(1))
    threading.Thread(target=reader, daemon=True).start()
    end = time.time() + 120
    while not found and proc.poll() is None and time.time() < end:
        time.sleep(0.05)
    if not found:
        stop_server(proc)
        report(False, "start the server", " ".join(shown) + ": " + " | ".join(lines[:4]))
        return None
    report(True, "start the server", " ".join(shown) + " -> " + found[0])
    return proc, found[0]


def stop_server(proc):
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except Exception:  # noqa: BLE001
            proc.kill()
            proc.wait()


def run(args):
    url = args.url.rstrip("/")
    origin = urllib.parse.urlsplit(url)
    origin = f"{origin.scheme}://{origin.netloc}"
    narrow_png = args.narrow_screenshot or (os.path.splitext(args.screenshot)[0] + "_narrow.png")

    # ---- plain HTTP ----
    try:
        status, headers, body = http_get(url + "/", timeout=30)
    except Exception as e:  # noqa: BLE001
        report(False, "GET /", repr(e))
        return 1
    hdr = {k.lower(): v for k, v in headers.items()}
    report(status == 200 and "text/html" in hdr.get("content-type", ""), "GET / serves the page",
           f"HTTP {status}, {hdr.get('content-type')}, {len(body)} bytes")
    html = body.decode("utf-8", "replace")
    external = [m for m in ("http://", "https://", "//cdn", "@import") if m in html.replace("http://www.w3.org", "")]
    report(not external, "page references no external resources", ", ".join(external) or "self-contained")
    csp = hdr.get("content-security-policy", "")
    if args.no_csp_check:
        info("Content-Security-Policy", csp or "(none)")
    else:
        report(all(d in csp for d in CSP_EXPECTED), "Content-Security-Policy header", csp or "(missing)")

    status, _, body = http_get(url + "/v1/models", args.api_key)
    model_id = None
    try:
        model_id = json.loads(body)["data"][0]["id"]
    except Exception:  # noqa: BLE001
        pass
    if not report(status == 200 and bool(model_id), "GET /v1/models", f"HTTP {status}, model {model_id!r}"):
        if status == 401:
            print("      (the server wants an API key: pass --api-key or set TINYGPT_API_KEY)")

    # ---- browser ----
    os.environ.setdefault("SE_AVOID_STATS", "true")
    from selenium import webdriver
    from selenium.common.exceptions import NoAlertPresentException, TimeoutException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    profile = tempfile.TemporaryDirectory(prefix="tinygpt-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = args.chromium
    for flag in ([] if args.show else ["--headless=new"]) + [
        "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage", "--disable-extensions",
        "--no-default-browser-check", "--lang=en-US", "--window-size=1280,860",
        f"--user-data-dir={profile.name}",
    ]:
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=args.chromedriver), options=opts)
    cdp = None
    try:
        driver.set_window_size(1280, 860)
        driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": INIT_SCRIPT})
        driver.get(url + "/")

        def js(script, *a):
            return driver.execute_script(script, *a)

        def state():
            return js("return document.body.getAttribute('data-state')")

        def wait(cond, timeout, what):
            try:
                return WebDriverWait(driver, timeout, poll_frequency=0.02).until(lambda d: cond())
            except TimeoutException:
                raise TimeoutError("timed out waiting for " + what) from None

        def assistants():
            return driver.find_elements(By.CSS_SELECTOR, "#messages .message.assistant")

        def last_reply():
            return js("""var c = document.querySelectorAll('#messages .message.assistant');
                var m = c[c.length - 1]; if (!m) return null;
                var e = m.querySelector('.error-text');
                return {text: m.querySelector('.content').textContent, cls: m.className,
                        finish: m.getAttribute('data-finish'), tokens: m.getAttribute('data-tokens'),
                        error: e ? e.textContent : null};""")

        def throttle(on):
            """DevTools network emulation: a tiny model streams its whole reply in milliseconds."""
            if args.throttle <= 0:
                return
            driver.execute_cdp_cmd("Network.enable", {})
            driver.execute_cdp_cmd("Network.emulateNetworkConditions", {
                "offline": False, "latency": 0, "uploadThroughput": -1,
                "downloadThroughput": args.throttle if on else -1})

        def set_field(el_id, value):
            el = driver.find_element(By.ID, el_id)
            if not el.is_displayed():
                driver.find_element(By.ID, "settings-toggle").click()
                wait(el.is_displayed, 5, "#" + el_id + " to show")
            el.clear()
            el.send_keys(str(value))
            js("arguments[0].dispatchEvent(new Event('change', {bubbles: true}))", el)

        def type_and_send(text):
            box = driver.find_element(By.ID, "input")
            box.click()
            lines = text.split("\n")
            for i, line in enumerate(lines):
                if i:
                    box.send_keys(Keys.SHIFT, Keys.ENTER)
                box.send_keys(line)
            box.send_keys(Keys.ENTER)

        # -- page and model name --
        wait(lambda: js("return document.readyState") == "complete", 30, "the page to load")
        ids = ["input", "send", "stop", "new-chat", "messages", "system-prompt", "temperature", "top-p",
               "max-tokens", "model-name", "status"]
        missing = [i for i in ids if not driver.find_elements(By.ID, i)]
        report(not missing, "page has the controls", "missing: " + ", ".join(missing) if missing else
               f"title {driver.title!r}")
        if args.api_key:
            set_field("api-key", args.api_key)
        try:
            wait(lambda: driver.find_element(By.ID, "model-name").text.strip() == (model_id or "\0"), 20,
                 "the model name")
            report(True, "model name in the header", model_id)
        except TimeoutError:
            report(False, "model name in the header",
                   f"shows {driver.find_element(By.ID, 'model-name').text!r}, expected {model_id!r}; "
                   f"status {driver.find_element(By.ID, 'status').text!r}")

        # -- 1. a streamed reply --
        throttle(True)
        if args.throttle > 0:
            info("network", f"downloads throttled to {args.throttle} B/s for the real replies")
        set_field("max-tokens", args.max_tokens)
        set_field("temperature", args.temperature)
        prompt1 = "Hi there!\nCan you tell me a short story?"
        box = driver.find_element(By.ID, "input")
        box.click()
        box.send_keys("Hi there!")
        box.send_keys(Keys.SHIFT, Keys.ENTER)  # a modifier stays down until the call ends
        box.send_keys("Can you tell me a short story?")
        report(box.get_attribute("value") == prompt1 and not assistants(), "Shift+Enter adds a newline",
               repr(box.get_attribute("value")))
        def watch_reply(send):
            """Sends with send(), polls the reply's length until idle; returns (growth steps, text)."""
            js(SAMPLER_START)
            n_before = len(assistants())
            send()
            polled, t0 = [], time.time()
            wait(lambda: len(assistants()) > n_before, 10, "the request to start")
            while time.time() - t0 < args.timeout:
                st, n = js("""var c = document.querySelectorAll('#messages .message.assistant .content');
                    return [document.body.getAttribute('data-state'),
                            c.length ? c[c.length - 1].textContent.length : -1];""")
                if st != "streaming":
                    break
                if not polled or n != polled[-1]:
                    polled.append(n)
                time.sleep(0.02)
            wait(lambda: state() == "idle", 5, "idle")
            samples = js(SAMPLER_STOP)
            grew_py = sum(1 for a, b in zip(polled, polled[1:]) if b > a and a >= 0)
            seen = [n for st, n in samples if st == "streaming"]
            grew_page = sum(1 for a, b in zip(seen, seen[1:]) if b > a)
            return grew_py, grew_page, polled, time.time() - t0

        try:
            grew_py, grew_page, polled, dt = watch_reply(lambda: box.send_keys(Keys.ENTER))
            users = driver.find_elements(By.CSS_SELECTOR, "#messages .message.user .content")
            report(bool(users) and users[0].get_attribute("textContent") == prompt1 and
                   box.get_attribute("value") == "", "Enter sends the message", "user turn shown, input cleared")
            r = last_reply()
            report(bool(r and r["text"].strip()) and not r["error"], "reply finished",
                   f"{len(r['text'])} chars, finish {r['finish']}, {r['tokens']} tokens, error {r['error']!r}"
                   if r else "no reply")
            if r:
                info("reply 1", repr(r["text"][:160]))
            tries = 1
            # A tiny model may end its reply after a few tokens, too soon to watch it grow: ask again.
            while max(grew_py, grew_page) < 2 and r and r["finish"] == "stop" and tries < 4:
                tries += 1
                info("reply streams in", f"the reply ended after {r['tokens']} tokens; asking again ({tries})")
                grew_py, grew_page, polled, dt = watch_reply(lambda: type_and_send("Tell me more, please."))
                r = last_reply()
            report(max(grew_py, grew_page) >= 2, "reply streams in",
                   f"length grew {grew_py}x by webdriver polling ({polled[:6]}...), "
                   f"{grew_page}x by in-page sampling, in {dt:.1f}s")
        except Exception as e:  # noqa: BLE001
            report(False, "reply streams in", str(e) or repr(e))

        # -- 2. Stop while streaming --
        set_field("max-tokens", args.stop_max_tokens)
        set_field("temperature", "2.0")  # a hot sample rarely ends by itself
        try:
            for attempt in range(1, 5):
                js(SAMPLER_START)
                n_before = len(assistants())
                type_and_send("Please write a very long story about a dragon." if attempt == 1 else "Go on, longer!")
                wait(lambda: len(assistants()) > n_before, 10, "the request to start")
                # let it produce a little (the length seen growing once), then stop it
                lens = []
                end = time.time() + args.timeout
                while time.time() < end and state() == "streaming":
                    n = len(assistants()[-1].find_element(By.CSS_SELECTOR, ".content").get_attribute("textContent"))
                    if n > 0 and (not lens or n > lens[-1]):
                        lens.append(n)
                    if len(lens) >= 2:
                        break
                    time.sleep(0.02)
                if state() == "streaming":
                    break
                js(SAMPLER_STOP)
                r = last_reply()
                info("Stop", f"the reply ended by itself (finish {r['finish']!r}, {r['tokens']} tokens) "
                             f"before Stop could be clicked (try {attempt})")
            else:
                raise TimeoutError("every reply ended before Stop could be clicked; "
                                   "raise --stop-max-tokens or lower --throttle")
            stop_visible = driver.find_element(By.ID, "stop").is_displayed()
            send_hidden = not driver.find_element(By.ID, "send").is_displayed()
            report(stop_visible and send_hidden, "Stop button shown while streaming",
                   f"stop visible={stop_visible} send hidden={send_hidden}, {lens[-1] if lens else 0} chars so far")
            t_stop = time.time()
            driver.find_element(By.ID, "stop").click()
            wait(lambda: state() == "idle", 10, "idle after Stop")
            dt = time.time() - t_stop
            js(SAMPLER_STOP)
            r1 = last_reply()
            time.sleep(1.0)
            r2 = last_reply()
            tokens = int(r2["tokens"] or 0)
            report("stopped" in r2["cls"].split() and r2["finish"] == "stopped" and not r2["error"],
                   "Stop ends the request", f"idle {dt * 1000:.0f} ms after the click, marked {r2['finish']!r}")
            report(r1["text"] == r2["text"] and len(r2["text"]) > 0 and tokens < args.stop_max_tokens,
                   "stopped reply kept, no longer growing",
                   f"{len(r2['text'])} chars, {tokens} < {args.stop_max_tokens} tokens")
            stopped_tag = assistants()[-1].find_elements(By.CSS_SELECTOR, ".meta .stop")
            report(bool(stopped_tag) and stopped_tag[0].is_displayed(), "stopped reply labelled",
                   stopped_tag[0].text if stopped_tag else "no label")
        except Exception as e:  # noqa: BLE001
            report(False, "Stop ends the request", str(e) or repr(e))

        # -- 3. the server still answers after the abort (follow-up in the same conversation) --
        set_field("max-tokens", 24)
        set_field("temperature", "0.8")
        n_before = len(assistants())
        type_and_send("Thanks! And one more short one?")
        try:
            wait(lambda: len(assistants()) > n_before, 10, "the follow-up to start")
            wait(lambda: state() == "idle", args.timeout, "the follow-up reply")
            r = last_reply()
            report(bool(r["text"].strip()) and not r["error"], "follow-up after Stop",
                   f"{len(r['text'])} chars, finish {r['finish']}, error {r['error']!r}")
        except Exception as e:  # noqa: BLE001
            report(False, "follow-up after Stop", str(e))

        throttle(False)
        os.makedirs(os.path.dirname(os.path.abspath(args.screenshot)), exist_ok=True)
        js("document.getElementById('messages').scrollTop = 1e9")
        time.sleep(0.2)
        report(driver.save_screenshot(args.screenshot), "screenshot", args.screenshot)

        # -- 3b. a conversation that outgrows the context: the page leaves the oldest turns out --
        ctx = js("return document.getElementById('max-tokens').max")
        if ctx and int(ctx) <= 2048:
            ctx = int(ctx)
            long_msg = " ".join(["the cat sat on the mat."] * max(4, int(ctx * 0.62) // 10))

            def say_long(text):
                n_before = len(assistants())
                js("document.getElementById('input').value = arguments[0];"
                   "document.getElementById('input').dispatchEvent(new Event('input'))", text)
                driver.find_element(By.ID, "send").click()
                wait(lambda: len(assistants()) > n_before and state() == "idle", args.timeout, "the reply")
                return last_reply()
            try:
                # each takes ~62% of the context: the second cannot fit next to the first
                say_long(long_msg)
                r = say_long("Again: " + long_msg)
                dropped = len(driver.find_elements(By.CSS_SELECTOR, "#messages .message.dropped"))
                report(bool(r["text"]) and not r["error"] and dropped >= 2,
                       "oldest turns left out when the context is full",
                       f"{dropped} messages faded, reply {len(r['text'])} chars, error {r['error']!r}")
            except Exception as e:  # noqa: BLE001
                report(False, "oldest turns left out when the context is full", str(e))
            n_before = len(assistants())
            dropped_before = len(driver.find_elements(By.CSS_SELECTOR, "#messages .message.dropped"))
            js("document.getElementById('input').value = arguments[0];"
               "document.getElementById('input').dispatchEvent(new Event('input'))", long_msg + " " + long_msg)
            driver.find_element(By.ID, "send").click()
            try:
                wait(lambda: len(assistants()) > n_before and state() == "idle", args.timeout, "the error")
                r = last_reply()
                dropped = len(driver.find_elements(By.CSS_SELECTOR, "#messages .message.dropped"))
                report(bool(r["error"]) and "context" in r["error"] and dropped == dropped_before,
                       "a message too long for the context is refused",
                       f"error {r['error'][:80]!r}..., {dropped} faded (was {dropped_before})")
            except Exception as e:  # noqa: BLE001
                report(False, "a message too long for the context is refused", str(e))
        else:
            info("context", f"skipped: context length {ctx!r} not known or large")

        # -- 4. New conversation --
        driver.find_element(By.ID, "new-chat").click()
        try:
            wait(lambda: not driver.find_elements(By.CSS_SELECTOR, "#messages .message"), 5, "an empty thread")
        except TimeoutError:
            pass
        n_left = len(driver.find_elements(By.CSS_SELECTOR, "#messages .message"))
        report(n_left == 0 and state() == "idle", "New chat clears the conversation", f"{n_left} messages left")

        # -- 5. injected replies: escaping and error display --
        def via_cdp():
            caps = driver.capabilities.get("goog:chromeOptions", {})
            addr = caps.get("debuggerAddress")
            if not addr:
                raise RuntimeError("no debuggerAddress")
            targets = json.loads(urllib.request.urlopen(f"http://{addr}/json/list", timeout=5).read())
            page = [t for t in targets if t.get("type") == "page" and t.get("url", "").startswith(origin)]
            c = Cdp(page[0]["webSocketDebuggerUrl"])
            c.call("Fetch.enable", {"patterns": [{"urlPattern": "*/v1/chat/completions*", "requestStage": "Request"}]})
            return c

        mode = "cdp"
        try:
            cdp = via_cdp()
        except Exception as e:  # noqa: BLE001
            info("interception", f"CDP Fetch unavailable ({e!r}); overriding window.fetch instead")
            mode = "fetch"

        def inject(status, ctype, body_text):
            """Make the next POST /v1/chat/completions answer (status, ctype, body_text)."""
            if mode == "fetch":
                js("""var st = arguments[0], ct = arguments[1], txt = arguments[2], real = window.fetch;
                    window.fetch = function (u, o) {
                      if (String(u).indexOf('/v1/chat/completions') < 0) return real(u, o);
                      window.fetch = real;
                      var bytes = new TextEncoder().encode(txt), i = 0;
                      var rs = new ReadableStream({pull: function (c) {
                        if (i >= bytes.length) { c.close(); return; }
                        c.enqueue(bytes.slice(i, i + 37)); i += 37; }});
                      return Promise.resolve(new Response(rs, {status: st, headers: {'Content-Type': ct}}));
                    };""", status, ctype, body_text)
                return lambda: None

            def answer():
                ev = cdp.wait_event("Fetch.requestPaused", 15)
                cdp.call("Fetch.fulfillRequest", {
                    "requestId": ev["params"]["requestId"], "responseCode": status,
                    "responseHeaders": [{"name": "Content-Type", "value": ctype},
                                        {"name": "Cache-Control", "value": "no-cache"}],
                    "body": base64.b64encode(body_text.encode()).decode()})
            return answer

        def injected_turn(prompt, status, ctype, body_text):
            answer = inject(status, ctype, body_text)
            n = len(assistants())
            type_and_send(prompt)
            answer()
            wait(lambda: len(assistants()) > n and state() == "idle", 15, "the injected reply")
            return last_reply()

        try:
            r = injected_turn("Show me some HTML.", 200, "text/event-stream", sse_body(XSS_PIECES))
            tags = js("""var m = document.getElementById('messages');
                return m.querySelectorAll('img, b, script').length;""")
            time.sleep(0.3)  # give an onerror handler a chance to run
            try:
                alert_text = driver.switch_to.alert.text
                driver.switch_to.alert.dismiss()
            except NoAlertPresentException:
                alert_text = None
            xss = js("return [window.__xss, window.__alerts]")
            report(r["text"] == XSS_TEXT, f"HTML in a reply is shown as text ({mode})", repr(r["text"][:70]) + "...")
            report(tags == 0 and not alert_text and xss[0] == 0, "no element or script from the reply",
                   f"{tags} img/b/script elements, alert {alert_text!r}, __xss {xss[0]}")
            shown = assistants()[-1].find_element(By.CSS_SELECTOR, ".content").text
            report("<img src=x onerror=alert(1)>" in shown, "injected markup visible on screen", repr(shown[:40]))

            r = injected_turn("Now fail please.", 400, "application/json", json.dumps(
                {"error": {"message": "max_tokens must be at least 1", "type": "invalid_request_error",
                           "param": "max_tokens", "code": None}}))
            st = driver.find_element(By.ID, "status").text
            report(r["error"] == "max_tokens must be at least 1" and "max_tokens must be at least 1" in st,
                   "HTTP error shown", f"message {r['error']!r}, status {st!r}")

            r = injected_turn("Fail in the middle.", 200, "text/event-stream",
                              sse_body(["Partial ", "answer"], error="engine <b>overloaded</b>"))
            report(r["text"] == "Partial answer" and r["error"] == "engine <b>overloaded</b>",
                   "in-stream error event shown", f"kept {r['text']!r}, error {r['error']!r}")
        except Exception as e:  # noqa: BLE001
            report(False, f"injected replies ({mode})", repr(e))
        finally:
            if cdp:
                try:
                    cdp.call("Fetch.disable")
                except Exception:  # noqa: BLE001
                    pass

        # -- 6. page hygiene: CSP, no external requests, console --
        csp_v = js("return window.__csp")
        report(not csp_v, "no CSP violations", "; ".join(csp_v) if csp_v else "none")
        res = js("return performance.getEntriesByType('resource').map(function (e) { return e.name; })")
        foreign = [u for u in res if not u.startswith(origin)]
        report(not foreign, "only same-origin requests", ", ".join(foreign) if foreign else f"{len(res)} requests")
        try:
            logs = driver.get_log("browser")
        except Exception:  # noqa: BLE001
            logs = []
        bad = [e["message"] for e in logs if e.get("level") == "SEVERE"
               and "favicon.ico" not in e["message"]
               # HTTP statuses of the API (401 before the key is set, the injected 400) are checked above
               and not ("Failed to load resource" in e["message"] and origin + "/v1/" in e["message"])]
        report(not bad, "no console errors", " | ".join(bad)[:300] if bad else f"{len(logs)} log lines")

        # -- 7. a narrow window --
        driver.set_window_size(390, 800)
        time.sleep(0.4)
        overflow = js("return document.documentElement.scrollWidth - document.documentElement.clientWidth")
        usable = all(driver.find_element(By.ID, i).is_displayed() for i in ("input", "send", "new-chat"))
        js("document.getElementById('messages').scrollTop = 1e9")
        time.sleep(0.2)
        driver.save_screenshot(narrow_png)
        report(overflow <= 0 and usable, "narrow window (390px)",
               f"horizontal overflow {overflow}px, controls visible {usable}, screenshot {narrow_png}")
    except Exception as e:  # noqa: BLE001
        report(False, "browser session", repr(e))
    finally:
        if cdp:
            cdp.close()
        driver.quit()
        profile.cleanup()

    failed = [n for ok, n in results if not ok]
    print(f"{len(results) - len(failed)}/{len(results)} checks passed" + (": FAILED " + ", ".join(failed) if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
