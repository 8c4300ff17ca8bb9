"""A headless Chromium driven through the DevTools protocol, for looking at the Snakemake report.

No browser-automation package: Chromium's `--remote-debugging-pipe` reads protocol commands (JSON,
each ended by a NUL byte) on file descriptor 3 and writes replies and events on 4, so a pipe pair
and the standard library suffice. One page, one window size, commands answered in order.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path


def find_chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


class Browser:
    """`with Browser(width, height) as page:` a blank page in a headless Chromium window."""

    def __init__(self, width: int = 1400, height: int = 900, timeout: float = 60.0):
        self.width, self.height, self.timeout = width, height, timeout
        self._next_id = 0
        self._buffer = b""

    def __enter__(self) -> "Browser":
        chromium = find_chromium()
        if chromium is None:
            raise FileNotFoundError("no chromium on PATH")
        self._profile = tempfile.TemporaryDirectory(prefix="duodiff-chromium-")
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()

        def pipes_at_3_and_4():  # in the child, before exec
            # Out of the way first: either pipe end may itself be descriptor 3 or 4. The copies
            # at 3 and 4 are inheritable; everything else Python opened is closed on exec.
            high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_browser_r, from_browser_w)]
            os.dup2(high[0], 3)
            os.dup2(high[1], 4)

        self._process = subprocess.Popen(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--disable-background-networking", "--no-first-run", "--hide-scrollbars",
             f"--user-data-dir={self._profile.name}", f"--window-size={self.width},{self.height}",
             "--remote-debugging-pipe", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            close_fds=False, preexec_fn=pipes_at_3_and_4)
        os.close(to_browser_r)
        os.close(from_browser_w)
        target = next(t for t in self.send("Target.getTargets")["targetInfos"] if t["type"] == "page")
        self._session = self.send("Target.attachToTarget", targetId=target["targetId"], flatten=True)["sessionId"]
        self.send("Page.enable", session=True)
        self.send("Runtime.enable", session=True)
        self.send("Emulation.setDeviceMetricsOverride", session=True, width=self.width, height=self.height,
                  deviceScaleFactor=1, mobile=False)
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.send("Browser.close")
        except Exception:
            pass
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        os.close(self._to_browser)
        os.close(self._from_browser)
        self._profile.cleanup()

    def send(self, method: str, session: bool = False, **params) -> dict:
        """Send one command (to the page with session=True, else to the browser); return its result."""
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = self._session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            while b"\0" not in self._buffer:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no reply to {method} in {self.timeout} s")
                chunk = os.read(self._from_browser, 1 << 20)
                if not chunk:
                    raise ConnectionError(f"chromium closed the pipe while waiting for {method}")
                self._buffer += chunk
            raw, self._buffer = self._buffer.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._next_id:  # events (no id) are dropped
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def evaluate(self, expression: str, context_id: int | None = None):
        """The value of a JavaScript expression in the page (awaited when it is a promise)."""
        params = {"expression": expression, "returnByValue": True, "awaitPromise": True}
        if context_id is not None:
            params["contextId"] = context_id
        result = self.send("Runtime.evaluate", session=True, **params)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression!r}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 30.0, what: str | None = None,
                 context_id: int | None = None):
        """Poll a JavaScript expression until it is truthy; return its value."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression, context_id)
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"waited {timeout} s for {what or expression}")
            time.sleep(0.1)

    def open(self, url: str) -> None:
        self.send("Page.navigate", session=True, url=url)
        self.wait_for("document.readyState === 'complete'", what=f"{url} to load")

    def frame_context(self, url_prefix: str) -> int:
        """An execution context inside the (first) child frame whose URL starts with url_prefix:
        the report shows html results in data: iframes, which the page's own scripts cannot enter."""
        deadline = time.monotonic() + 30
        while True:
            tree = self.send("Page.getFrameTree", session=True)["frameTree"]
            frames = [child["frame"] for child in tree.get("childFrames", [])
                      if child["frame"].get("url", "").startswith(url_prefix)]
            if frames:
                world = self.send("Page.createIsolatedWorld", session=True, frameId=frames[0]["id"],
                                  worldName="duodiff-test")
                return world["executionContextId"]
            if time.monotonic() > deadline:
                raise TimeoutError(f"no frame at {url_prefix}")
            time.sleep(0.1)

    def screenshot(self, path: Path) -> Path:
        data = self.send("Page.captureScreenshot", session=True, format="png")["data"]
        Path(path).write_bytes(base64.b64decode(data))
        return Path(path)
