// Drives `agentd console` in headless Debian chromium through playwright-core, as a security
// engineer would, and prints one JSON object of what it saw (tests/tests/console.rs asserts).
//
//   node console_browser.js --url URL --screenshots DIR --agent SPIFFE_ID --delegator SPIFFE_ID
//        --principal P --victim SPIFFE_ID --reason TEXT
"use strict";
const { chromium, request } = require("playwright-core");
const path = require("path");

function args() {
  const out = {};
  const argv = process.argv.slice(2);
  for (let i = 0; i < argv.length; i += 2) out[argv[i].replace(/^--/, "")] = argv[i + 1];
  for (const k of ["url", "screenshots", "agent", "delegator", "principal", "victim", "reason"]) {
    if (!out[k]) throw new Error(`--${k} is required`);
  }
  return out;
}

async function main() {
  const a = args();
  const login = new URL(a.url);
  const origin = login.origin;
  const seen = { errors: [] };
  const shot = (page, name) => page.screenshot({ path: path.join(a.screenshots, `${name}.png`), fullPage: true });

  // Without the token or the cookie, everything is 401; a wrong token too.
  const anon = await request.newContext();
  seen.anonymous_status = (await anon.get(origin + "/")).status();
  seen.anonymous_graph_status = (await anon.get(origin + "/graph")).status();
  seen.wrong_token_status = (await anon.get(origin + "/?token=0000")).status();

  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    headless: true,
    args: ["--no-sandbox"],
  });
  try {
    const context = await browser.newContext({ viewport: { width: 1400, height: 900 } });
    const page = await context.newPage();
    page.on("pageerror", (e) => seen.errors.push(`pageerror: ${e.message}`));
    page.on("console", (m) => {
      if (m.type() === "error") seen.errors.push(`console: ${m.text()}`);
    });

    // Login: the token is exchanged for a cookie and dropped from the address bar.
    const first = await page.goto(a.url);
    seen.login_status = first.status();
    seen.after_login_url = page.url();
    const cookies = await context.cookies();
    seen.cookie = cookies.map((c) => ({ name: c.name, httpOnly: c.httpOnly, sameSite: c.sameSite }));
    seen.token_reuse_status = (await anon.get(a.url)).status();
    seen.csp = (await page.request.get(origin + "/")).headers()["content-security-policy"] || "";

    // Inventory.
    seen.counts = await page.locator("section.counts").innerText();
    seen.inventory = await page.$$eval("#agents tbody tr", (rows) =>
      rows.map((r) => ({
        spiffe_id: r.cells[0].innerText,
        owner: r.cells[1].innerText,
        status: r.cells[6].innerText,
      })),
    );
    await shot(page, "inventory");
    // The find box hides rows that do not match (the page's script runs).
    await page.fill("input[data-filter]", a.agent);
    seen.rows_visible_after_find = await page.locator("#agents tbody tr:not(.hidden)").count();
    await page.fill("input[data-filter]", "");
    // The owner and status filters (server-side).
    const rowIds = () => page.$$eval("#agents tbody tr", (rows) => rows.map((r) => r.cells[0].innerText));
    await page.goto(origin + "/?owner=team-scheduling");
    seen.rows_owner_team_scheduling = await rowIds();
    await page.goto(origin + "/?status=orphaned");
    seen.rows_status_orphaned = await rowIds();
    await page.goto(origin + "/");

    // The agent page of the delegated agent: its grant's principal and scopes.
    await Promise.all([page.waitForNavigation(), page.click(`#agents a:text-is("${a.agent}")`)]);
    seen.agent_title = await page.locator("h1").innerText();
    seen.agent_grants = await page.$$eval("table.grants tbody tr", (rows) =>
      rows.map((r) => ({ principal: r.cells[1].innerText, chain: r.cells[2].innerText, scopes: r.cells[3].innerText })),
    );
    seen.agent_live = await page.locator("h2", { hasText: "Live SVIDs" }).innerText();
    await shot(page, "agent");

    // The delegation graph.
    await page.goto(origin + "/graph");
    seen.graph_vertices = await page.$$eval("svg#delegation-graph .vertex", (vs) =>
      vs.map((v) => ({
        name: v.dataset.name,
        kind: v.classList.contains("principal") ? "principal" : "agent",
        // Drawn, not only in the DOM: a label swallowed by an unclosed <rect> has no box.
        label_width: v.querySelector("text").getBBox().width,
      })),
    );
    seen.graph_edges = await page.$$eval("svg#delegation-graph g.edge", (es) =>
      es.map((e) => ({ from: e.dataset.from, to: e.dataset.to, label: e.querySelector("text.edge-label").textContent })),
    );
    await shot(page, "graph");
    await Promise.all([page.waitForNavigation(), page.click(`svg a.vertex[data-name="${a.delegator}"]`)]);
    seen.graph_click_title = await page.locator("h1").innerText();

    // The audit timeline.
    await page.goto(origin + "/audit");
    seen.audit_verify = await page.locator("p.verify").innerText();
    seen.audit_rows = await page.locator("table.audit tbody tr").count();
    seen.audit_seqs = await page.$$eval("table.audit tbody tr", (rows) => rows.map((r) => Number(r.cells[0].innerText)));
    seen.audit_head = Number((seen.audit_verify.match(/head #(\d+)/) || [])[1]);
    await shot(page, "audit");

    // A forged cross-site POST: the cookie rides along (as a lax browser would send it), the
    // CSRF token does not.
    const forged = await page.request.post(origin + "/revoke", {
      form: { kind: "entry", id: "x", reason: "forged" },
      headers: { Origin: "http://evil.example" },
    });
    seen.forged_status = forged.status();
    const forgedSameOrigin = await page.request.post(origin + "/revoke", {
      form: { kind: "entry", id: "x", reason: "forged" },
    });
    seen.forged_same_origin_status = forgedSameOrigin.status();

    // The kill switch, from the victim's page.
    await page.goto(origin + "/");
    await Promise.all([page.waitForNavigation(), page.click(`#agents a:text-is("${a.victim}")`)]);
    await Promise.all([page.waitForNavigation(), page.click("a.kill:text-is(\"Revoke this agent's entry\")")]);
    seen.confirm_text = await page.locator("section.confirm").innerText();
    // A cross-site POST that somehow has the CSRF token: the Origin check refuses it alone.
    const csrf = await page.inputValue("input[name=csrf]");
    const victimId = await page.inputValue("input[name=id]");
    seen.forged_with_token_status = (
      await page.request.post(origin + "/revoke", {
        form: { csrf, kind: "entry", id: victimId, reason: "forged" },
        headers: { Origin: "http://evil.example" },
      })
    ).status();
    await shot(page, "confirm");
    await page.fill("textarea[name=reason]", a.reason);
    seen.revoke_clicked_ms = Date.now();
    await Promise.all([page.waitForNavigation(), page.click("button.danger")]);
    seen.revoked_page_ms = Date.now();
    if ((await page.locator("section.done").count()) === 0) {
      throw new Error(`the revocation did not succeed: ${await page.locator("main").innerText()}`);
    }
    seen.result_text = await page.locator("section.done").innerText();
    seen.result_url = page.url();
    // Post/redirect/get: reloading the result page does not revoke again.
    await page.reload();
    seen.result_after_reload = await page.locator("p.result").innerText();
    seen.covered = Number(await page.locator("b.covered").innerText());
    await shot(page, "revoked");

    await page.goto(origin + "/audit?action=revocation.*");
    seen.audit_after = await page.locator("table.audit tbody").innerText();
    seen.audit_after_actions = await page.$$eval("table.audit tbody tr", (rows) => rows.map((r) => r.cells[2].innerText));
    await page.goto(origin + "/?status=revoked");
    seen.rows_status_revoked = await rowIds();
    await context.close();
  } finally {
    await browser.close();
    await anon.dispose();
  }
  process.stdout.write(JSON.stringify(seen) + "\n");
}

main().catch((e) => {
  process.stderr.write(`console_browser: ${e.stack || e}\n`);
  process.exit(1);
});
