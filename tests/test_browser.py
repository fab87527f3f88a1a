"""A real headless Chromium, on a page at Colab's origin, uses a tether server as Colab does.

The page is served by Playwright's router at https://colab.research.google.com (no network), so
the browser applies its real CORS, preflight, credential and local-network-access rules.
"""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator

import pytest

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


async def test_status_page_lists_kernels_and_releases_one(browser, server, tmp_path):
    """The buttons Colab lacks: the page shows the kernel and its Release button frees it."""
    from tether.replay import ColabClient

    async with ColabClient(server.url, server.token) as c:
        session = await c.create_session("page.ipynb")
        kid = session["kernel"]["id"]
        assert (await c.execute(kid, "x = 1")).status == "ok"
        ctx = await browser.new_context()
        page = await ctx.new_page()
        try:
            await page.goto(f"{server.url}/tether/?token={server.token}")
            row = page.locator(f"tr[data-kernel='{kid}']")
            await row.wait_for(timeout=15000)
            assert "page.ipynb" in await row.inner_text()
            await page.screenshot(path=str(tmp_path / "status-page.png"))
            await row.get_by_role("button", name="Release").click()
            await page.get_by_text("every process ended, GPU memory freed").wait_for(timeout=60000)
            await row.wait_for(state="detached", timeout=15000)
        finally:
            await ctx.close()
        kernels = await c.get_json("/api/kernels")
    assert kid not in {k["id"] for k in kernels}


async def test_status_page_needs_the_token(browser, server):
    ctx = await browser.new_context()
    page = await ctx.new_page()
    try:
        response = await page.goto(f"{server.url}/tether/")
        assert response.status == 403 or "/login" in page.url
    finally:
        await ctx.close()
