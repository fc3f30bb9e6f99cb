"""The console in a real browser: Debian's Chromium driven by Playwright for Python.

Signs in, walks every view with the broker's live data, takes screenshots (desktop and phone),
watches the live audit feed receive an event it causes, revokes a task, freezes an agent,
reloads a broken policy and reads the error, inspects a token, runs axe-core on every view, and
gives the second approval (four eyes) of a waiting request in the approval queue.
Collects console errors and CSP violations (a listener added before any page script runs).

Input: one JSON argument (dashboard, api, operator, password, agent_key, task_id, task_token,
freeze_agent, ssh_session, policy_path, broken_policy, shots, axe, approval_id). Prints a JSON report and
exits 1 if anything failed.
"""
import json
import os
import sys
import time
import urllib.request

from playwright.sync_api import sync_playwright

cfg = json.loads(sys.argv[1])
base = "http://" + cfg["dashboard"]
views = ["/", "/approvals", "/agents", "/tasks", "/ssh", "/recordings", "/remotes", "/audit", "/graphs", "/policy", "/inspect", "/audit/verify"]
report = {"console_errors": [], "csp": [], "axe": {}, "failures": [], "screenshots": [], "steps": []}
os.makedirs(cfg["shots"], exist_ok=True)

WATCH = """
window.__csp = [];
document.addEventListener('securitypolicyviolation', (e) => {
  window.__csp.push(e.violatedDirective + ' ' + e.blockedURI);
});
"""


def fail(msg):
    report["failures"].append(msg)


def step(msg):
    report["steps"].append(msg)


def mcp_call(tool, args):
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {
        "name": tool, "arguments": args, "_meta": {
            "io.modelcontextprotocol/protocolVersion": "2026-07-28",
            "io.modelcontextprotocol/clientCapabilities": {},
            "io.modelcontextprotocol/clientInfo": {"name": "console-walk", "version": "1"}}}}).encode()
    req = urllib.request.Request("http://" + cfg["api"] + "/mcp", data=body, method="POST", headers={
        "Authorization": "Bearer " + cfg["agent_key"], "Content-Type": "application/json",
        "Accept": "application/json, text/event-stream", "MCP-Protocol-Version": "2026-07-28",
        "Mcp-Method": "tools/call", "Mcp-Name": tool})
    with urllib.request.urlopen(req, timeout=20) as r:
        return r.read().decode()


def wait_true(page, expr, timeout=10.0):
    """Polls `expr` from here (page.evaluate is not subject to the page's CSP; Playwright's
    wait_for_function polls with a string the console's CSP rightly refuses to evaluate)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if page.evaluate(expr):
            return True
        time.sleep(0.05)
    raise TimeoutError(expr)


def watch(page, where):
    page.on("console", lambda m: m.type == "error" and report["console_errors"].append(where + ": " + m.text))
    page.on("pageerror", lambda e: report["console_errors"].append(where + ": " + str(e)))


def collect_csp(page, where):
    try:
        for v in page.evaluate("window.__csp || []"):
            report["csp"].append(where + ": " + v)
    except Exception as e:  # a page that navigated away
        fail(f"{where}: CSP listener unreadable: {e}")


def sign_in(page):
    page.goto(base + "/")
    if not page.url.endswith("/login"):
        fail("a signed-out visit did not land on /login: " + page.url)
    page.fill("#name", cfg["operator"])
    page.fill("#password", cfg["password"])
    page.click("form.login button")
    page.wait_for_url(base + "/")


def shot(page, name):
    path = os.path.join(cfg["shots"], name + ".png")
    page.screenshot(path=path, full_page=True)
    report["screenshots"].append(path)


with sync_playwright() as p:
    browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    ctx.add_init_script(WATCH)
    page = ctx.new_page()
    watch(page, "desktop")
    sign_in(page)
    step("signed in")

    for v in views:
        page.goto(base + v)
        page.wait_for_load_state("networkidle")
        if v == "/ssh":
            wait_true(page, "![...document.querySelectorAll('.reach')].some(e => e.textContent.startsWith('checking'))")
            body = page.content()
            if cfg["ssh_session"] not in body:
                fail("the SSH view does not show the live session " + cfg["ssh_session"])
            if "yes (" not in body:
                fail("the SSH view does not show the target as reachable")
        if v == "/tasks" and cfg["task_id"] not in page.content():
            fail("the task view does not show task " + cfg["task_id"])
        if v == "/graphs" and page.locator("polyline[points]").count() == 0:
            fail("no sparkline drawn")
        collect_csp(page, v)
        shot(page, "desktop" + (v.replace("/", "_") if v != "/" else "_overview"))
    step("walked every view")

    # The live feed: an event this script causes appears without a reload.
    page.goto(base + "/audit")
    wait_true(page, "document.getElementById('feed-state').textContent.startsWith('Live')")
    mcp_call("task_create", {"description": "seen-live-in-the-console"})
    try:
        wait_true(page, "[...document.querySelectorAll('#feed li')].some(li => li.textContent.includes('task_create'))")
        step("live feed showed the new event")
    except Exception:
        fail("the live audit feed did not show the task_create event")
    shot(page, "desktop_audit_live")

    # Revoke a task from its preview.
    page.goto(base + "/tasks")
    page.click(f"a[href='/tasks/{cfg['task_id']}/revoke']")
    if cfg["task_id"] not in page.content():
        fail("the revoke preview does not name the task")
    shot(page, "desktop_revoke_preview")
    page.click("main form button.danger")
    if "is revoked" not in page.content():
        fail("revoking from the console did not say it was done: " + page.inner_text("main"))
    step("revoked the task")

    # Freeze an agent from the agents view.
    page.goto(base + "/agents")
    page.click(f"form[action='/freeze']:has(input[name='name'][value='{cfg['freeze_agent']}']) button")
    if "is frozen" not in page.content():
        fail("freezing from the console did not say it was done: " + page.inner_text("main"))
    page.goto(base + "/")
    if cfg["freeze_agent"] not in page.inner_text("main"):
        fail("the overview does not list the freeze")
    shot(page, "desktop_frozen")
    step("froze the agent")

    # A broken policy on disk: reload shows the problems in place; the old policy stays.
    with open(cfg["policy_path"]) as f:
        good = f.read()
    with open(cfg["policy_path"], "w") as f:
        f.write(cfg["broken_policy"])
    page.goto(base + "/policy")
    if "Changes on disk" not in page.content():
        fail("the policy view does not show the difference with the file on disk")
    page.click("form[action='/policy/reload'] button")
    text = page.inner_text("main")
    if "invalid" not in text or "stays in force" not in text:
        fail("a broken reload did not show its error: " + text[:400])
    shot(page, "desktop_policy_error")
    with open(cfg["policy_path"], "w") as f:
        f.write(good)
    step("broken reload showed its error")

    # The token inspector, with the (now revoked) task token.
    page.goto(base + "/inspect")
    page.fill("#token", cfg["task_token"])
    page.click("form.inspect button")
    text = page.inner_text("main")
    if "revoked" not in text or cfg["task_id"] not in text:
        fail("the inspector did not explain the revoked token: " + text[:400])
    if cfg["task_token"] in page.url:
        fail("the token ended up in the URL")
    shot(page, "desktop_inspect")
    collect_csp(page, "inspect")
    step("inspected the token")

    # A phone-sized screen: everything fits the width.
    phone = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    phone.add_init_script(WATCH)
    pp = phone.new_page()
    watch(pp, "phone")
    sign_in(pp)
    for v in ["/", "/agents", "/tasks", "/ssh", "/audit"]:
        pp.goto(base + v)
        pp.wait_for_load_state("networkidle")
        over = pp.evaluate("document.body.scrollWidth - window.innerWidth")
        if over > 1:
            fail(f"phone {v}: the page is {over}px wider than the screen")
        collect_csp(pp, "phone " + v)
        shot(pp, "phone" + (v.replace("/", "_") if v != "/" else "_overview"))
    step("phone-sized views fit")

    # axe-core on every view (its script is added with CSP bypassed in this context only).
    ax = browser.new_context(viewport={"width": 1280, "height": 900}, bypass_csp=True)
    ap = ax.new_page()
    sign_in(ap)
    for v in views + ["/login"]:
        ap.goto(base + v)
        ap.wait_for_load_state("networkidle")
        ap.add_script_tag(path=cfg["axe"])
        res = ap.evaluate("axe.run(document, {resultTypes: ['violations']})")
        bad = [f"{x['id']} ({x['impact']}): {x['help']} [{len(x['nodes'])}]" for x in res["violations"]
               if x["impact"] in ("serious", "critical")]
        report["axe"][v] = bad
        if bad:
            fail(f"axe {v}: " + "; ".join(bad))
    step("axe-core checked every view")

    # The approval queue: the waiting request, with its exact command and the first approval;
    # the second approver answers here.
    page.goto(base + "/approvals")
    card = page.locator(f"article[id='{cfg['approval_id']}']")
    if card.count() != 1:
        fail("the queue does not show request " + cfg["approval_id"])
    else:
        text = card.inner_text()
        for want in ["touch /tmp", "1 so far", "operator:uid0", "Recent activity"]:
            if want not in text:
                fail(f"the request card lacks {want!r}: " + text[:400])
        shot(page, "desktop_approval_queue")
        card.locator("form:has(input[name='decision'][value='approve']) input[name='reason']").fill("checked the disk")
        card.locator("form:has(input[name='decision'][value='approve']) button").click()
        if "is approved" not in page.content():
            fail("approving in the console did not say it was done: " + page.inner_text("main"))
        step("approved the request in the queue")
    browser.close()

if report["console_errors"]:
    fail("console errors: " + "; ".join(report["console_errors"]))
if report["csp"]:
    fail("CSP violations: " + "; ".join(report["csp"]))
print(json.dumps(report, indent=1))
sys.exit(1 if report["failures"] else 0)
