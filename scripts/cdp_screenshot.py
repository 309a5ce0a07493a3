"""Drive headless Chromium over the DevTools protocol: open a URL, run JavaScript steps (e.g.
dismiss a dialog, expand graph groups), save a PNG. Used by scripts/dagster_screenshot.sh.

    python scripts/cdp_screenshot.py URL OUT.png [--js 'code' ...] [--wait 8]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import socket
import subprocess
import tempfile
import time
import urllib.request

import websockets


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def drive(ws_url: str, url: str, steps: list[str], wait: float, out: str, width: int, height: int) -> None:
    async with websockets.connect(ws_url, max_size=64 * 2**20) as ws:
        n = 0

        async def call(method: str, **params):
            nonlocal n
            n += 1
            await ws.send(json.dumps({"id": n, "method": method, "params": params}))
            while True:
                msg = json.loads(await ws.recv())
                if msg.get("id") == n:
                    return msg.get("result", {})

        await call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)
        await call("Page.navigate", url=url)
        await asyncio.sleep(wait)
        for js in steps:
            res = await call("Runtime.evaluate", expression=js, awaitPromise=True)
            print("step:", res.get("result", {}).get("value"))
            await asyncio.sleep(wait / 2)
        shot = await call("Page.captureScreenshot", format="png")
        with open(out, "wb") as fh:
            fh.write(base64.b64decode(shot["data"]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("out")
    ap.add_argument("--js", action="append", default=[])
    ap.add_argument("--wait", type=float, default=8.0)
    ap.add_argument("--size", default="1800x1100")
    args = ap.parse_args()
    width, height = map(int, args.size.split("x"))
    port = free_port()
    profile = tempfile.mkdtemp()
    proc = subprocess.Popen(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                             f"--remote-debugging-port={port}", f"--user-data-dir={profile}", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                pages = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json", timeout=1).read())
                page = next(p for p in pages if p.get("type") == "page")
                break
            except (OSError, StopIteration):
                time.sleep(0.2)
        else:
            raise SystemExit("chromium did not start")
        asyncio.run(drive(page["webSocketDebuggerUrl"], args.url, args.js, args.wait, args.out, width, height))
    finally:
        proc.terminate()
        proc.wait(timeout=10)


if __name__ == "__main__":
    main()
