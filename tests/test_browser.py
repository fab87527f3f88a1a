"""A real headless Chromium, on a page at Colab's origin, uses a tether server as Colab does.

The page is served by Playwright's router at https://colab.research.google.com (no network), so
the browser applies its real CORS, preflight, credential and local-network-access rules.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from conftest import RunningServer, start_server, stop_server
from kernel_client import Api, alive_pids, kill_pids, wait_dead

from tether.config import COLAB_ORIGIN

playwright = pytest.importorskip("playwright.async_api")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(not CHROMIUM, reason="needs Debian's chromium (scripts/setup test)")

# flags that work as root on a machine with no network (testbed.md)
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]

COLAB_LIKE = """
async ([base, token]) => {
  const auth = {Authorization: 'token ' + token, 'Content-Type': 'application/json'};
  const opts = (method, body) => ({method, headers: auth, credentials: 'include',
                                   body: body && JSON.stringify(body)});
  const specs = await (await fetch(base + '/api/kernelspecs', opts('GET'))).json();
  const created = await fetch(base + '/api/sessions', opts('POST',
      {path: 'browser.ipynb', type: 'notebook', name: 'browser.ipynb', kernel: {name: 'python3'}}));
  const session = await created.json();
  const ws = new WebSocket(base.replace('http', 'ws') + '/api/kernels/' + session.kernel.id +
                           '/channels?session_id=b1&token=' + token);
  const out = await new Promise((resolve, reject) => {
    let text = '';
    ws.onerror = () => reject(new Error('websocket failed'));
    ws.onopen = () => ws.send(JSON.stringify({channel: 'shell', parent_header: {}, metadata: {},
      header: {msg_id: 'm1', msg_type: 'execute_request', session: 'b1', username: 'colab', version: '5.3'},
      content: {code: 'print(6 * 7)', silent: false, store_history: true, user_expressions: {},
                allow_stdin: false}}));
    ws.onmessage = (ev) => {
      const msg = JSON.parse(ev.data);
      if (msg.parent_header.msg_id !== 'm1') return;
      if (msg.msg_type === 'stream') text += msg.content.text;
      if (msg.msg_type === 'status' && msg.content.execution_state === 'idle') resolve(text);
    };
  });
  ws.close();
  const deleted = await fetch(base + '/api/sessions/' + session.id, opts('DELETE'));
  return {specs: Object.keys(specs.kernelspecs), created: created.status, out,
          deleted: deleted.status};
}
"""

FETCH_STATUS = """
async ([url, token]) => {
  try {
    const r = await fetch(url, {headers: {Authorization: 'token ' + token}, credentials: 'include'});
    return r.status;
  } catch (e) { return String(e); }
}
"""


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[object]:
    async with playwright.async_playwright() as p:
        b = await p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        await b.close()


async def page_at(browser, origin: str, *, allow_local_network: bool = True):
    ctx = await browser.new_context()
    if allow_local_network:
        # Chrome 142+ asks the user before a public page may reach localhost (docs/colab-runtime.md)
        await ctx.grant_permissions(["local-network-access"], origin=origin)
    page = await ctx.new_page()
    await page.route(f"{origin}/**", lambda route: route.fulfill(
        status=200, content_type="text/html", body="<html><body>notebook</body></html>"))
    await page.goto(f"{origin}/")
    return page


async def test_colab_page_runs_code_on_the_runtime(browser, server):
    page = await page_at(browser, COLAB_ORIGIN)
    result = await page.evaluate(COLAB_LIKE, [server.url, server.token])
    assert result == {"specs": ["python3"], "created": 201, "out": "42\n", "deleted": 204}


async def test_wrong_token_is_a_visible_403_not_a_cors_error(browser, server):
    page = await page_at(browser, COLAB_ORIGIN)
    assert await page.evaluate(FETCH_STATUS, [server.url + "/api/kernels", "0" * 48]) == 403


async def test_foreign_origin_is_blocked_by_the_browser(browser, server):
    page = await page_at(browser, "https://evil.example")
    status = await page.evaluate(FETCH_STATUS, [server.url + "/api/kernels", server.token])
    assert "Failed to fetch" in str(status)


async def test_without_local_network_permission_chrome_blocks(browser, server):
    """Why the README tells users to allow Chrome's local-network prompt."""
    page = await page_at(browser, COLAB_ORIGIN, allow_local_network=False)
    status = await page.evaluate(FETCH_STATUS, [server.url + "/api/status", server.token])
    assert "Failed to fetch" in str(status)


async def test_status_page_needs_the_token(browser, server):
    ctx = await browser.new_context()
    page = await ctx.new_page()
    try:
        response = await page.goto(f"{server.url}/tether/")
        assert response.status == 403 or "/login" in page.url
    finally:
        await ctx.close()


# --- the runtime's page, through a real server with real kernels and recorded GPU answers -------

FAKE_SMI = Path(__file__).parent / "fixtures" / "fake_nvidia_smi.py"
UUID0 = "GPU-5e1f9c6a-2b7d-8f4e-1a3c-9d0b7e6f5a41"
SCREENSHOTS_ENV = "TETHER_SCREENSHOT_DIR"  # docs/: scripts regenerate the README's images


def gpu_env(root: Path) -> tuple[Path, dict[str, str]]:
    smi = root / "smi"
    smi.mkdir()
    for name in ("query-gpu.csv", "query-gpu-uuid.csv", "pmon.txt"):
        (smi / name).write_text((FAKE_SMI.parent / "nvidia-smi" / name).read_text())
    (smi / "query-compute-apps.csv").write_text("")
    return smi, {"TETHER_NVIDIA_SMI": str(FAKE_SMI), "FAKE_NVIDIA_SMI_DIR": str(smi),
                 "FAKE_NVIDIA_SMI_LIVE_ONLY": "1",  # the driver forgets processes that exited
                 "TETHER_NVIDIA_DEVICES": str(root / "no-devices" / "nvidia[0-9]*")}


@pytest.fixture(scope="module")
def gpu_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningServer, Path]]:
    root = tmp_path_factory.mktemp("page")
    smi, env = gpu_env(root)
    # a Slurm job's server: the page shows the walltime left (Slurm sets both variables)
    env |= {"SLURM_JOB_ID": "4242", "SLURM_JOB_END_TIME": str(int(time.time()) + 7200)}
    srv = start_server(root, "--kill-grace", "1", env=env)
    yield srv, smi
    stop_server(srv)


@pytest.fixture
async def tab(browser) -> AsyncIterator[object]:
    ctx = await browser.new_context(viewport={"width": 1320, "height": 600})
    yield await ctx.new_page()
    await ctx.close()


async def kernel_pid(api: Api, kid: str) -> int:
    listing = await api.call("GET", "/tether/api/kernels")
    return int(next(k for k in listing["kernels"] if k["id"] == kid)["pid"])


async def open_page(tab, srv: RunningServer):
    await tab.goto(f"{srv.url}/tether/?token={srv.token}")
    return tab


async def record_some_history(page, smi: Path) -> None:
    for util in (5, 40, 85, 92, 60, 88, 95, 70, 90, 97, 64):
        (smi / "query-gpu.csv").write_text(
            f"0, NVIDIA H100 80GB HBM3, {20000 + util * 200}, 81559, {util}, {util // 2}\n"
            f"1, NVIDIA H100 80GB HBM3, 0, 81559, 0, 0\n")
        await page.wait_for_timeout(5200)  # one sample of the server's monitor


async def test_page_shows_gpus_kernels_and_foreign_holders_light_and_dark(
        browser, tab, gpu_server, tmp_path):
    srv, smi = gpu_server
    api = Api(srv.url, srv.token)
    a = (await api.new_session("train.ipynb"))["kernel"]["id"]
    b = (await api.new_session("explore.ipynb"))["kernel"]["id"]
    foreign = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    try:
        # the driver says: train.ipynb's kernel holds 2 GiB and computes; someone else 1 GiB
        (smi / "query-compute-apps.csv").write_text(
            f"{await kernel_pid(api, a)}, {UUID0}, 2048\n{foreign.pid}, {UUID0}, 1024\n")
        (smi / "pmon.txt").write_text(
            "# gpu pid type sm mem enc dec command\n# Idx # C/G % % % % name\n"
            f"    0 {await kernel_pid(api, a)} C 64 30 - - python3\n")
        page = await open_page(tab, srv)
        row_a, row_b = (page.locator(f"tbody[data-kernel='{k}']") for k in (a, b))
        await row_a.wait_for(timeout=15000)
        await row_b.wait_for(timeout=15000)
        assert "explore.ipynb" in await row_b.inner_text()
        # the kernel as `tether ps` shows it and `tether release ID` takes it: 8 characters
        assert await row_a.locator(".kid").inner_text() == a[:8]
        assert await row_a.locator(".kid").get_attribute("title") == a
        # two tabs for two hosts differ: the host's name in the title and the header
        host = socket.gethostname()
        assert host in await page.title()
        assert host in await page.locator("h1").inner_text()
        facts = await page.locator("#facts").inner_text()
        assert re.search(r"Slurm job 4242: 1 h 59 min of walltime left", facts), facts
        assert re.search(r"RAM [\d.]+ / [\d.]+ GiB", facts) and "server pid" in facts
        gpu0 = page.locator(".gpu[data-gpu='0']")
        await gpu0.wait_for(timeout=15000)
        text = await gpu0.inner_text()
        assert "NVIDIA H100 80GB HBM3" in text and "81,559 MiB" in text
        assert await page.locator(".gpu").count() == 2
        # GPU memory as a bar too, with the figures as its value (MiB, as `tether ps` prints)
        meter = gpu0.get_by_role("meter", name="GPU 0 memory", exact=True)
        assert await meter.get_attribute("aria-valuenow") == "4539"
        assert await meter.get_attribute("aria-valuemax") == "81559"
        assert "4,539 of 81,559 MiB used (6 %)" == await meter.get_attribute("aria-valuetext")
        assert await page.get_by_role("meter", name="GPU 1 memory", exact=True).count() == 1
        await row_a.locator("td.gpumem", has_text="2,048").wait_for(timeout=15000)
        await row_a.locator("td.gpuutil", has_text="64").wait_for(timeout=15000)
        # the GPU indices as `tether ps`'s GPUS column: "0", "-" for none
        assert await row_a.locator("td.gpus").inner_text() == "0"
        assert await row_b.locator("td.gpus").inner_text() == "-"
        await row_a.locator("td.policy", has_text="using a GPU").wait_for(timeout=15000)
        uptime = await row_b.locator("td.uptime").inner_text()
        assert re.fullmatch(r"\d+ (s|min)", uptime), f"started a moment ago, not {uptime!r}"
        policy = await row_b.locator("td.policy").inner_text()
        assert re.fullmatch(r"released in (59 min|1 h 00 min) if still idle", policy), policy
        await page.locator(f"#foreign tr[data-pid='{foreign.pid}']",
                           has_text="not a kernel of this server").wait_for(timeout=15000)
        assert await page.locator(".gpu svg polyline.spark-util").count() == 2
        for name in ("Interrupt", "Restart", "Release"):
            assert await row_a.get_by_role("button", name=name, exact=True).count() == 1
        for name in ("Release all", "Release all and stop the server"):
            assert await page.get_by_role("button", name=name, exact=True).count() == 1

        shots = Path(os.environ.get(SCREENSHOTS_ENV) or tmp_path)
        if os.environ.get(SCREENSHOTS_ENV):  # the README's images: a minute of GPU history
            await record_some_history(page, smi)
        backgrounds = {}
        for scheme in ("light", "dark"):
            await page.emulate_media(color_scheme=scheme)
            await page.wait_for_timeout(1200)  # one refresh more: the sparklines have points
            backgrounds[scheme] = await page.evaluate(
                "getComputedStyle(document.documentElement).backgroundColor")
            await page.screenshot(path=str(shots / f"page-{scheme}.png"), full_page=True)
        assert backgrounds["light"] != backgrounds["dark"]
        assert (shots / "page-dark.png").stat().st_size < 400_000
    finally:
        (smi / "query-compute-apps.csv").write_text("")
        (smi / "query-gpu.csv").write_text((FAKE_SMI.parent / "nvidia-smi" / "query-gpu.csv")
                                           .read_text())
        foreign.kill()
        foreign.wait(10)
        await api.call("POST", "/tether/api/release", {})


async def test_interrupt_stops_the_cell_and_restart_keeps_the_id(tab, gpu_server):
    srv, _ = gpu_server
    api = Api(srv.url, srv.token)
    kid = (await api.new_session("busy.ipynb"))["kernel"]["id"]
    channel = await api.connect(kid)
    try:
        assert (await channel.execute("x = 41")) == ""
        first = await kernel_pid(api, kid)
        page = await open_page(tab, srv)
        row = page.locator(f"tbody[data-kernel='{kid}']")
        await row.wait_for(timeout=15000)
        cell = asyncio.ensure_future(channel.execute("import time; time.sleep(60)", timeout=90))
        await row.locator("td.state", has_text="busy").wait_for(timeout=15000)
        await row.get_by_role("button", name="Interrupt", exact=True).click()
        with pytest.raises(AssertionError, match="KeyboardInterrupt"):
            await asyncio.wait_for(cell, 30)
        assert await kernel_pid(api, kid) == first, "the kernel stays"
        assert (await channel.execute("print(x + 1)")) == "42\n", "and so do its variables"

        await row.get_by_role("button", name="Restart", exact=True).click()
        await page.get_by_role("dialog").get_by_role("button", name="Restart", exact=True).click()
        # what it did is said under the kernel's row, not at the foot of the page
        await page.locator(f"#kernels tbody[data-kernel='{kid}'] + tbody.note #message",
                           has_text="a new kernel process, same kernel").wait_for(timeout=60000)
        second = await kernel_pid(api, kid)
        assert second != first and await wait_dead([first]) == []
        assert kid in {k["id"] for k in await api.call("GET", "/api/kernels")}
    finally:
        channel.close()
        await api.call("POST", "/tether/api/release", {})


async def test_release_asks_first_then_frees_the_kernel_and_its_processes(tab, gpu_server):
    srv, smi = gpu_server
    api = Api(srv.url, srv.token)
    kid = (await api.new_session("page.ipynb"))["kernel"]["id"]
    channel = await api.connect(kid)
    code = ("import json, os, subprocess, sys\n"
            "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'],"
            " start_new_session=True)\nprint(json.dumps([os.getpid(), p.pid]))")
    pids = [int(p) for p in (await channel.execute(code)).strip().strip("[]").split(",")]
    channel.close()
    (smi / "query-compute-apps.csv").write_text(f"{pids[1]}, {UUID0}, 3072\n")
    try:
        page = await open_page(tab, srv)
        row = page.locator(f"tbody[data-kernel='{kid}']")
        await row.locator("td.gpumem", has_text="3,072").wait_for(timeout=15000)
        release = row.get_by_role("button", name="Release", exact=True)
        await release.focus()  # the keyboard: Enter opens the confirmation, Escape cancels it
        await page.keyboard.press("Enter")
        dialog = page.get_by_role("dialog")
        await dialog.wait_for(timeout=5000)
        assert "page.ipynb" in await dialog.inner_text()
        await page.keyboard.press("Escape")
        await dialog.wait_for(state="hidden", timeout=5000)
        await page.wait_for_timeout(1500)
        assert alive_pids(pids) == pids and await row.count() == 1, "cancelled: nothing happens"

        await release.click()
        await dialog.get_by_role("button", name="Release", exact=True).click()
        # where the row was: the row goes, the message under it stays
        done = page.locator(f"#kernels tbody.note[data-for='{kid}'] #message",
                            has_text=f"Released page.ipynb (kernel {kid[:8]})")
        await done.wait_for(timeout=60000)
        message = await done.inner_text()
        assert "3,072 MiB of GPU memory" in message and str(pids[1]) in message
        await row.wait_for(state="detached", timeout=15000)
        assert kid not in {k["id"] for k in await api.call("GET", "/api/kernels")}
        assert await wait_dead(pids) == []
    finally:
        (smi / "query-compute-apps.csv").write_text("")
        kill_pids(alive_pids(pids))


async def test_release_all_and_stop_the_server(tab, tmp_path):
    srv = start_server(tmp_path, "--kill-grace", "1")
    try:
        api = Api(srv.url, srv.token)
        kid = (await api.new_session("last.ipynb"))["kernel"]["id"]
        pid = await kernel_pid(api, kid)
        page = await open_page(tab, srv)
        await page.locator(f"tbody[data-kernel='{kid}']").wait_for(timeout=15000)
        await page.get_by_role("button", name="Release all and stop the server", exact=True).click()
        await page.get_by_role("dialog").get_by_role(
            "button", name="Release all and stop", exact=True).click()
        await page.locator("#bulk #message", has_text="The server is stopping").wait_for(
            timeout=60000)
        assert "Released 1 kernel(s)" in await page.locator("#message").inner_text()
        assert await asyncio.to_thread(srv.proc.wait, 30) == 0
        assert await wait_dead([pid]) == []
    finally:
        stop_server(srv)


LONG_PATHS = [f"experiments/2026-12/a-sweep-over-learning-rates-and-batch-sizes/run-{n}-with-a-"
              f"rather-long-name-lr-3e-4-batch-{n * 64}-warmup-1000-steps.ipynb" for n in (1, 2, 3)]


async def test_page_fits_760_px_and_says_each_result_next_to_its_action(
        browser, gpu_server, tmp_path):
    srv, _ = gpu_server
    api = Api(srv.url, srv.token)
    ids = [(await api.new_session(path))["kernel"]["id"] for path in LONG_PATHS]
    ctx = await browser.new_context(viewport={"width": 760, "height": 900})
    try:
        page = await open_page(await ctx.new_page(), srv)
        rows = [page.locator(f"tbody[data-kernel='{k}']") for k in ids]
        for row in rows:  # with every figure: the widths are those of a running kernel
            await row.locator("td.uptime", has_text=re.compile(r"\d")).wait_for(timeout=15000)
        await page.locator(".gpu[data-gpu='1']").wait_for(timeout=15000)
        await rows[1].get_by_role("button", name="Interrupt", exact=True).click()
        await page.locator("#message", has_text="Interrupted").wait_for(timeout=30000)
        assert await page.evaluate(
            "document.getElementById('message').closest('tbody').previousElementSibling"
            ".dataset.kernel") == ids[1], "under the row of the kernel it acted on"
        width = await page.evaluate("[document.documentElement.scrollWidth, "
                                    "document.documentElement.clientWidth]")
        await page.screenshot(path=str(tmp_path / "page-760.png"), full_page=True)
        assert width[0] <= width[1], f"horizontal scroll at 760 px: {width}"

        await page.get_by_role("button", name="Release all", exact=True).click()
        dialog = page.get_by_role("dialog")
        await dialog.get_by_role("button", name="Release all", exact=True).click()
        await page.locator("#bulk #message", has_text="Released 3 kernel(s)").wait_for(
            timeout=60000)
        assert await page.locator("#kernels #message").count() == 0
        for row in rows:
            await row.wait_for(state="detached", timeout=15000)
    finally:
        await ctx.close()
        await api.call("POST", "/tether/api/release", {})


async def test_tether_open_shows_the_page_and_keeps_the_token_off_the_command_line(
        tab, gpu_server, tmp_path):
    srv, _ = gpu_server
    argv_log = tmp_path / "browser-argv"
    fake_browser = tmp_path / "browser"
    read = tmp_path / "browser-read"  # what the browser read: the redirect, removed after
    fake_browser.write_text(f"#!/bin/sh\necho \"$@\" > {argv_log}\ncat \"${{1#file://}}\" > {read}\n")
    fake_browser.chmod(0o755)
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(srv.runtime_dir),
           "XDG_RUNTIME_DIR": str(tmp_path / "xdg"), "BROWSER": str(fake_browser)}
    tether = [sys.executable, "-m", "tether", "open"]
    printed = await asyncio.to_thread(subprocess.run, [*tether, "--print-url"], env=env,
                                      capture_output=True, text=True, timeout=60)
    assert printed.returncode == 0, printed.stderr
    url = printed.stdout.strip()
    assert url == f"{srv.url}/tether/?token={srv.token}"
    response = await tab.goto(url)
    assert "default-src 'none'" in response.headers["content-security-policy"], "nothing external"
    await tab.get_by_role("button", name="Release all", exact=True).wait_for(timeout=15000)

    opened = await asyncio.to_thread(subprocess.run, tether, env=env, capture_output=True,
                                     text=True, timeout=60)
    assert opened.returncode == 0, opened.stderr
    argv = argv_log.read_text().strip()
    assert argv.startswith("file://") and srv.token not in argv
    redirect = Path(argv.removeprefix("file://"))
    assert srv.token in read.read_text() and not redirect.exists()
