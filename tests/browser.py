"""A real headless Chromium (Debian's chromium, installed by tests/setup.sh), driven
through its DevTools protocol over a pipe (--remote-debugging-pipe: JSON messages
ended by NUL on fds 3 and 4), so that no WebSocket library and no port are needed.
Used by tests/test_dashboard.py, and by bench/run.py for B1 with a page open."""
import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import tempfile
import time

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class Browser:
    """One headless Chromium with a profile of its own; pages are its tabs."""

    def __init__(self, width=1280, height=900):
        if CHROMIUM is None:
            raise RuntimeError("chromium not found: tests/run installs it (tests/setup.sh)")
        self.profile = tempfile.mkdtemp(prefix="cli-py-chromium-")
        commands, replies = os.pipe(), os.pipe()

        def onto_fds_3_and_4():
            # Moved high first: either end may itself be fd 3 or 4.
            ours = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in (commands[0], replies[1])]
            os.dup2(ours[0], 3)
            os.dup2(ours[1], 4)
        self.process = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe",
             f"--user-data-dir={self.profile}", "--no-first-run", "--disable-extensions",
             "--disable-background-networking", "--disable-component-update",
             f"--window-size={width},{height}", "about:blank"],
            preexec_fn=onto_fds_3_and_4, close_fds=False,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(commands[0])
        os.close(replies[1])
        self.to_chromium, self.from_chromium = commands[1], replies[0]
        self.unread = b""
        self.last_id = 0

    def send(self, method, params=None, session=None, timeout=30.0):
        """Call METHOD; its result (events that come meanwhile are dropped)."""
        self.last_id += 1
        message = {"id": self.last_id, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        data = json.dumps(message).encode() + b"\0"
        while data:
            data = data[os.write(self.to_chromium, data):]
        deadline = time.monotonic() + timeout
        while True:
            reply = self.receive(deadline)
            if reply.get("id") == self.last_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def receive(self, deadline):
        while b"\0" not in self.unread:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.from_chromium], [], [], left)[0]:
                raise TimeoutError("chromium did not answer in time")
            chunk = os.read(self.from_chromium, 1 << 20)
            if not chunk:
                raise RuntimeError("chromium exited")
            self.unread += chunk
        message, self.unread = self.unread.split(b"\0", 1)
        return json.loads(message)

    def new_page(self, width=1280, height=900):
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget",
                            {"targetId": target, "flatten": True})["sessionId"]
        page = Page(self, target, session)
        page.call("Emulation.setDeviceMetricsOverride", {
            "width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
        return page

    def close(self):
        try:
            self.send("Browser.close", timeout=5)
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self.to_chromium)
        os.close(self.from_chromium)
        shutil.rmtree(self.profile, ignore_errors=True)


class Page:
    """A tab: go to a URL, run JavaScript in it, take a screenshot."""

    def __init__(self, browser, target, session):
        self.browser = browser
        self.target = target
        self.session = session

    def call(self, method, params=None):
        return self.browser.send(method, params, self.session)

    def goto(self, url):
        self.call("Page.navigate", {"url": url})

    def evaluate(self, expression):
        """EXPRESSION's value, computed in the page (a promise is waited for)."""
        result = self.call("Runtime.evaluate", {"expression": expression,
                                                "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def text(self):
        return self.evaluate("document.body ? document.body.innerText : ''") or ""

    def click(self, selector):
        """Click the element SELECTOR finds, as the page's own handlers see a click; False
        if there is none."""
        return self.evaluate(f"(e => e ? (e.click(), true) : false)"
                             f"(document.querySelector({json.dumps(selector)}))")

    def screenshot(self, path):
        data = self.call("Page.captureScreenshot", {"format": "png",
                                                    "captureBeyondViewport": True})["data"]
        with open(path, "wb") as image:
            image.write(base64.b64decode(data))

    def close(self):
        self.browser.send("Target.closeTarget", {"targetId": self.target})
