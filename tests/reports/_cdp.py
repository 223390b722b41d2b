"""A minimal Chrome DevTools Protocol client over ``--remote-debugging-pipe`` (file descriptors
3 and 4, NUL-terminated JSON): no websocket library, no browser download, no port opened.

Every request that would leave the machine (http, ws, ftp) is intercepted (``Fetch``),
recorded and failed, on top of the browser's own offline mode; when user namespaces are
available the browser also runs in a network namespace without any network.
"""

from __future__ import annotations

import base64
import json
import os
import queue
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run",
         "--disable-default-apps", "--disable-extensions", "--mute-audio",
         "--remote-debugging-pipe")
LOCAL_SCHEMES = ("file:", "data:", "about:")


class CDPError(RuntimeError):
    pass


def _network_namespace() -> list[str]:
    """``unshare -rn`` when this machine lets an unprivileged process make one."""
    if shutil.which("unshare") is None:
        return []
    probe = subprocess.run(["unshare", "-rn", "true"], capture_output=True, check=False)
    return ["unshare", "-rn"] if probe.returncode == 0 else []


class Browser:
    def __init__(self, executable: str, user_data_dir: Path, *, width: int = 1280,
                 height: int = 900, timeout_s: float = 60.0):
        self.timeout_s = timeout_s
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        self.namespace = _network_namespace()
        args = [*FLAGS, f"--user-data-dir={user_data_dir}", f"--window-size={width},{height}",
                "about:blank"]
        # The browser reads commands on fd 3 and writes replies on fd 4: a shell puts the
        # pipe ends there (through spare fds: a pipe end may itself be 3 or 4) and execs it.
        close = "".join(f" {fd}<&-" for fd in (to_browser_r, from_browser_w)
                        if fd not in (3, 4))
        script = (f"exec 100<&{to_browser_r} 101>&{from_browser_w}{close}; "
                  'exec 3<&100 4>&101 100<&- 101>&-; exec "$@"')
        self.proc = subprocess.Popen(
            [*self.namespace, "bash", "-c", script, "bash", executable, *args],
            pass_fds=(to_browser_r, from_browser_w), stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._id = 0
        self._replies: dict[int, dict] = {}
        self._events: queue.Queue = queue.Queue()
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    # ---------------------------------------------------------------- transport
    def _read(self) -> None:
        buf = b""
        while True:
            try:
                chunk = os.read(self._from_browser, 1 << 20)
            except OSError:
                chunk = b""
            if not chunk:
                with self._cond:
                    self._replies[-1] = {"closed": True}
                    self._cond.notify_all()
                return
            buf += chunk
            while b"\0" in buf:
                raw, buf = buf.split(b"\0", 1)
                msg = json.loads(raw)
                if "id" in msg:
                    with self._cond:
                        self._replies[msg["id"]] = msg
                        self._cond.notify_all()
                else:
                    self._events.put(msg)

    def send(self, method: str, params: dict | None = None, session: str | None = None
             ) -> dict:
        self._id += 1
        msg: dict[str, Any] = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._to_browser, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + self.timeout_s
        with self._cond:
            while self._id not in self._replies:
                if -1 in self._replies:
                    raise CDPError(f"the browser exited: {self._stderr_tail()}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise CDPError(f"no reply to {method} in {self.timeout_s} s")
                self._cond.wait(left)
            reply = self._replies.pop(self._id)
        if "error" in reply:
            raise CDPError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    def events(self) -> list[dict]:
        out = []
        while True:
            try:
                out.append(self._events.get_nowait())
            except queue.Empty:
                return out

    def wait_event(self, method: str, session: str, handler, timeout_s: float) -> dict:
        """Events until ``method`` arrives; every other event goes to ``handler``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                event = self._events.get(timeout=0.2)
            except queue.Empty:
                continue
            handler(event)
            if event.get("method") == method and event.get("sessionId") == session:
                return event
        raise CDPError(f"{method} did not arrive in {timeout_s} s")

    def _stderr_tail(self) -> str:
        if self.proc.poll() is None:
            return "still running"
        return (self.proc.stderr.read() or b"").decode(errors="replace")[-2000:]

    def close(self) -> None:
        try:
            self.send("Browser.close")
        except (CDPError, OSError):
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        for fd in (self._to_browser, self._from_browser):
            try:
                os.close(fd)
            except OSError:
                pass


FIGURE_CHECK = """(() => {
  const out = [];
  for (const box of document.querySelectorAll('.reportlet')) {
    const img = box.querySelector('img'), svg = box.querySelector('svg');
    if (img) {
      out.push({id: box.id, kind: 'png', width: img.naturalWidth, height: img.naturalHeight,
                ok: img.complete && img.naturalWidth > 0 && img.naturalHeight > 0});
    } else if (svg) {
      const r = svg.getBoundingClientRect();
      const drawn = svg.querySelectorAll('path, image, use, rect').length;
      out.push({id: box.id, kind: 'svg', width: r.width, height: r.height,
                ok: r.width > 0 && r.height > 0 && drawn > 0});
    } else {
      out.push({id: box.id, kind: 'none', ok: false});
    }
  }
  return JSON.stringify({figures: out, height: document.documentElement.scrollHeight,
                         resources: performance.getEntriesByType('resource').map(e => e.name),
                         title: document.title});
})()"""


def open_page(browser: Browser, url: str, *, screenshot: Path | None = None,
              full_page: bool = True, clip_selector: str | None = None,
              clip_height: int = 1400) -> dict:
    """Load ``url`` in a new tab with the network off; return console errors, exceptions,
    requests that tried to leave the machine, failed loads and the figure check; save a
    PNG screenshot (the whole page, or from ``clip_selector`` down ``clip_height`` px)."""
    target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
    session = browser.send("Target.attachToTarget", {"targetId": target,
                                                     "flatten": True})["sessionId"]
    report: dict[str, list] = {"console_errors": [], "exceptions": [], "external": [],
                               "failed": [], "log_errors": []}

    def handle(event: dict) -> None:
        method, params = event.get("method"), event.get("params", {})
        if event.get("sessionId") != session:
            return
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            report["console_errors"].append(" ".join(str(a.get("value", a.get("description")))
                                                     for a in params.get("args", [])))
        elif method == "Runtime.exceptionThrown":
            report["exceptions"].append(params.get("exceptionDetails", {}).get("text"))
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            report["log_errors"].append(params["entry"].get("text"))
        elif method == "Network.requestWillBeSent":
            request_url = params.get("request", {}).get("url", "")
            if not request_url.startswith(LOCAL_SCHEMES):
                report["external"].append(request_url)
        elif method == "Network.loadingFailed":
            report["failed"].append(params.get("errorText"))
        elif method == "Fetch.requestPaused":
            report["external"].append(params["request"]["url"])
            browser.send("Fetch.failRequest", {"requestId": params["requestId"],
                                               "errorReason": "InternetDisconnected"}, session)

    for method, params in (("Page.enable", {}), ("Runtime.enable", {}), ("Log.enable", {}),
                           ("Network.enable", {}),
                           ("Network.emulateNetworkConditions",
                            {"offline": True, "latency": 0, "downloadThroughput": -1,
                             "uploadThroughput": -1}),
                           # Only what would leave the machine is intercepted: pausing the
                           # file: page itself would hold Page.navigate's reply.
                           ("Fetch.enable", {"patterns": [{"urlPattern": p} for p in
                                                          ("http*", "ws*", "ftp*")]}),
                           ("Emulation.setDeviceMetricsOverride",
                            {"width": 1280, "height": 900, "deviceScaleFactor": 1,
                             "mobile": False})):
        browser.send(method, params, session)
    for event in browser.events():
        handle(event)
    browser.send("Page.navigate", {"url": url}, session)
    browser.wait_event("Page.loadEventFired", session, handle, browser.timeout_s)
    time.sleep(0.5)  # late console messages and requests
    for event in browser.events():
        handle(event)
    result = browser.send("Runtime.evaluate", {"expression": FIGURE_CHECK,
                                               "returnByValue": True}, session)
    check = json.loads(result["result"]["value"])
    report.update(check)
    report["external"] += [r for r in check["resources"] if not r.startswith(LOCAL_SCHEMES)]
    if screenshot is not None:
        params: dict[str, Any] = {"format": "png", "captureBeyondViewport": True}
        if clip_selector:
            top = browser.send("Runtime.evaluate", {
                "expression": f"document.querySelector({json.dumps(clip_selector)})"
                              ".getBoundingClientRect().top + window.scrollY",
                "returnByValue": True}, session)["result"]["value"]
            params["clip"] = {"x": 0, "y": max(0, top - 60), "width": 1280,
                              "height": clip_height, "scale": 1}
        elif full_page:
            height = min(int(check["height"]), 16000)
            params["clip"] = {"x": 0, "y": 0, "width": 1280, "height": height, "scale": 1}
        data = browser.send("Page.captureScreenshot", params, session)["data"]
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        screenshot.write_bytes(base64.b64decode(data))
    for event in browser.events():
        handle(event)
    browser.send("Target.closeTarget", {"targetId": target})
    return report
