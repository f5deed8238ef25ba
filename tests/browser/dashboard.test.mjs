// The dashboard in a real browser (Chromium driven by playwright-core), against a `loom serve`
// with real traffic from the mock upstream. Run by tests/browser.rs, which starts the server and
// passes LOOM_URL, LOOM_ADMIN_TOKEN, LOOM_CHROMIUM and LOOM_ARTIFACTS (where screenshots go).
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { readFile } from "node:fs/promises";
import { createRequire } from "node:module";
import { join } from "node:path";

// playwright-core is installed outside the repository (./infra/test.sh: NODE_PATH); require()
// finds it there, an ES import would not.
const { chromium } = createRequire(import.meta.url)("playwright-core");

const base = process.env.LOOM_URL;
const admin = process.env.LOOM_ADMIN_TOKEN;
const artifacts = process.env.LOOM_ARTIFACTS;
const password = "correct horse battery staple";
let browser;

before(async () => {
  browser = await chromium.launch({
    executablePath: process.env.LOOM_CHROMIUM || "/usr/bin/chromium",
    args: ["--no-sandbox", "--disable-gpu"],
  });
});
after(async () => browser?.close());

const shot = (page, name) => page.screenshot({ path: join(artifacts, `${name}.png`), fullPage: true });

async function api(method, path, token, body) {
  const response = await fetch(base + path, {
    method,
    headers: { authorization: `Bearer ${token}`, "content-type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await response.text();
  return { status: response.status, json: text ? JSON.parse(text) : null };
}

async function register(page, organization, email) {
  await page.goto(base + "/register");
  await page.getByLabel("Organization").fill(organization);
  await page.getByLabel("Email").fill(email);
  await page.getByLabel("Password").fill(password);
  await page.getByRole("button", { name: "Register" }).click();
  await page.waitForURL(base + "/");
  const tenants = (await api("GET", "/admin/tenants", admin)).json;
  return tenants.find((t) => t.name === organization).tenant_id;
}

async function key(tenant, role) {
  const created = await api("POST", "/admin/keys", admin, { tenant_id: tenant, role });
  assert.equal(created.status, 201);
  return created.json.key;
}

async function chat(key, model) {
  const response = await fetch(base + "/v1/chat/completions", {
    method: "POST",
    headers: { authorization: `Bearer ${key}`, "content-type": "application/json" },
    body: JSON.stringify({ model, messages: [{ role: "user", content: "the secret word is heron" }] }),
  });
  await response.text();
  return response.headers.get("x-request-id");
}

/// Reloads `page` until `check` holds (the read models fold the traffic in a moment).
async function eventually(page, check, what) {
  const deadline = Date.now() + 30_000;
  for (;;) {
    if (await check()) return;
    assert.ok(Date.now() < deadline, `timed out waiting for ${what}`);
    await page.waitForTimeout(300);
    await page.reload();
  }
}

test("a new organization's owner works through the dashboard", async (t) => {
  const context = await browser.newContext({ acceptDownloads: true, timezoneId: "Europe/Berlin" });
  const page = await context.newPage();
  let tenant, traces = [];

  await t.test("signed out, the dashboard asks to sign in, and offers registration", async () => {
    await page.goto(base + "/");
    assert.equal(new URL(page.url()).pathname, "/signin");
    await shot(page, "signin");
    await page.getByRole("link", { name: "Register an organization" }).click();
    assert.equal(new URL(page.url()).pathname, "/register");
    await shot(page, "register");
  });

  await t.test("registering signs the owner in", async () => {
    tenant = await register(page, "Initech", "ada@initech.test");
    await page.getByText("ada@initech.test · owner").waitFor();
  });

  await t.test("home shows the traffic's numbers", async () => {
    const developer = await key(tenant, "developer");
    for (let n = 0; n < 4; n++) traces.push(await chat(developer, "fast"));
    traces.push(await chat(developer, "nobody-serves-this"));
    await eventually(page, async () => {
      const value = page.locator('[data-metric="requests"] .value');
      return (await value.count()) > 0 && (await value.textContent()) === "5";
    }, "5 requests on home");
    const errors = await page.locator('[data-metric="error_rate"] .value').textContent();
    assert.equal(errors, "20.00 %");
    await page.locator("table.rows tbody tr").first().waitFor();
    await shot(page, "home");
    await page.getByRole("link", { name: "7 days" }).click();
    assert.match(page.url(), /window=7d/);
    await page.locator('[data-metric="requests"] .value').waitFor();
  });

  await t.test("traces: the list, a filter kept in the URL, a timeline in the panel", async () => {
    await page.getByRole("link", { name: "Traces" }).click();
    await eventually(page, async () => (await page.locator("tr[data-trace]").count()) === 5, "5 traces");
    await shot(page, "traces");
    await page.getByLabel("Status").selectOption("failed");
    await page.getByRole("button", { name: "Filter" }).click();
    assert.match(page.url(), /status=failed/);
    await eventually(page, async () => (await page.locator("tr[data-trace]").count()) === 1, "1 failed trace");
    await page.goto(base + "/traces");
    await page.locator("tr[data-trace]").first().waitFor();
    await page.locator("tr[data-trace] a[data-open]").first().click();
    const panel = page.locator("#panel");
    await panel.locator('[data-kind="completed"]').waitFor();
    assert.ok(await panel.locator('[data-kind="request"]').count() === 1);
    await panel.getByText("Details").first().click();
    await shot(page, "trace-timeline");
    await page.keyboard.press("Escape");
    assert.equal(await panel.isHidden(), true);
    await page.keyboard.press("/");
    assert.equal(await page.evaluate(() => document.activeElement.name), "model");
  });

  await t.test("analytics: charts in the browser's time zone, another zone and range, breakdowns", async () => {
    await page.getByRole("link", { name: "Analytics" }).click();
    await page.locator("svg.chart").first().waitFor();
    const zone = page.getByLabel("Time zone");
    assert.equal(await zone.inputValue(), "Europe/Berlin");
    await shot(page, "analytics");
    await zone.selectOption("Asia/Tokyo");
    await page.waitForURL(/tz=Asia%2FTokyo/);
    await page.getByRole("link", { name: "7 days" }).click();
    assert.match(page.url(), /window=7d/);
    assert.match(page.url(), /tz=Asia%2FTokyo/);
    await page.locator("svg.chart").first().waitFor();
    await page.getByRole("link", { name: "Provider" }).click();
    await page.getByRole("cell", { name: "openai" }).waitFor();
    await page.getByText("Error rate by model").waitFor();
    await page.getByRole("cell", { name: "nobody-serves-this" }).first().waitFor();
  });

  await t.test("quotas: today's usage per scope", async () => {
    await page.getByRole("link", { name: "Quotas" }).click();
    await page.getByRole("heading", { name: "Organization" }).waitFor();
    await shot(page, "quotas");
  });

  await t.test("policy: findings by rule and action", async () => {
    await page.getByRole("link", { name: "Policy" }).click();
    await page.getByText("No findings in this range").waitFor();
    await shot(page, "policy");
  });

  await t.test("admin: a project, and a key whose secret is shown once", async () => {
    await page.getByRole("link", { name: "Admin" }).click();
    await page.getByLabel("New project").fill("Support bot");
    await page.getByRole("button", { name: "Create", exact: true }).click();
    await page.getByRole("cell", { name: "Support bot" }).waitFor();
    await page.getByRole("button", { name: "Create key" }).click();
    const secret = (await page.locator("[data-new-key]").textContent()).trim();
    assert.match(secret, /^loom-/);
    await shot(page, "admin");
    await page.goto(base + "/manage");
    assert.equal(await page.getByText(secret).count(), 0);
  });

  await t.test("SQL: a query's rows, its CSV, an error said plainly, the limits in sight", async () => {
    await page.getByRole("link", { name: "SQL", exact: true }).click();
    await page.getByText("At most 10000 rows").waitFor();
    const sql = "SELECT event_type, count(*) AS events FROM events GROUP BY event_type ORDER BY event_type";
    const deadline = Date.now() + 30_000;
    for (;;) {
      await page.getByLabel("Query").fill(sql);
      await page.getByRole("button", { name: "Run" }).click();
      await page.waitForLoadState();
      if (await page.getByRole("cell", { name: "request.completed" }).count()) break;
      assert.ok(Date.now() < deadline, "the archive did not show the requests");
      await page.waitForTimeout(500);
    }
    await shot(page, "sql");
    const [download] = await Promise.all([
      page.waitForEvent("download"),
      page.getByRole("button", { name: "Download CSV" }).click(),
    ]);
    const csv = await readFile(await download.path(), "utf8");
    assert.equal(csv.split("\n")[0], "event_type,events");
    assert.match(csv, /request\.completed,5/);
    await page.getByLabel("Query").fill("SELECT nope FROM events");
    await page.getByLabel("Query").press("Control+Enter");
    await page.locator(".problem").waitFor();
    assert.match(await page.locator(".problem").textContent(), /nope/);
  });

  await t.test("the filtered list downloads as CSV", async () => {
    await page.goto(base + "/traces");
    const [download] = await Promise.all([
      page.waitForEvent("download"),
      page.getByRole("link", { name: "Download CSV" }).click(),
    ]);
    const csv = await readFile(await download.path(), "utf8");
    const lines = csv.trim().split("\n");
    assert.match(lines[0], /^trace_id,tenant_id,started_at/);
    assert.equal(lines.length, 1 + 5);
  });

  await t.test("the dark theme is remembered", async () => {
    await page.goto(base + "/");
    await page.getByRole("button", { name: "Theme" }).click();
    const theme = await page.evaluate(() => document.documentElement.dataset.theme);
    await page.reload();
    assert.equal(await page.evaluate(() => document.documentElement.dataset.theme), theme);
    if (theme !== "dark") {
      await page.getByRole("button", { name: "Theme" }).click();
      await page.reload();
    }
    assert.equal(await page.evaluate(() => document.documentElement.dataset.theme), "dark");
    await page.locator('[data-metric="requests"] .value').waitFor();
    await shot(page, "home-dark");
  });

  await t.test("a post without the form token is refused", async () => {
    const status = await page.evaluate(async () => {
      const response = await fetch("/signout", { method: "POST", body: new URLSearchParams({ token: "forged" }) });
      return response.status;
    });
    assert.equal(status, 403);
    await page.reload();
    assert.equal(new URL(page.url()).pathname, "/");
  });

  await t.test("signing out, and a wrong password", async () => {
    await page.getByRole("button", { name: "Sign out" }).click();
    assert.equal(new URL(page.url()).pathname, "/signin");
    await page.goto(base + "/traces");
    assert.equal(new URL(page.url()).pathname, "/signin");
    await page.getByLabel("Email").fill("ada@initech.test");
    await page.getByLabel("Password").fill("not my password");
    await page.getByRole("button", { name: "Sign in", exact: true }).click();
    await page.getByText("Wrong email or password").waitFor();
    await shot(page, "signin-refused");
    await page.getByLabel("Password").fill(password);
    await page.getByRole("button", { name: "Sign in", exact: true }).click();
    await page.waitForURL(/\/traces$/);
  });

  await t.test("a viewer's key sees timelines without bodies, and no admin page", async () => {
    const viewer = await browser.newPage();
    await viewer.goto(base + "/signin");
    await viewer.getByText("Sign in with an API key").click();
    await viewer.getByLabel("API key").fill(await key(tenant, "viewer"));
    await viewer.getByRole("button", { name: "Sign in with the key" }).click();
    await viewer.getByText("· viewer").waitFor();
    assert.equal(await viewer.getByRole("link", { name: "Admin" }).count(), 0);
    const refused = await viewer.goto(base + "/manage");
    assert.equal(refused.status(), 403);
    await viewer.getByText("needs the admin role or above").waitFor();
    assert.equal(await viewer.getByRole("button", { name: "Create key" }).count(), 0);
    await shot(viewer, "admin-refused-to-viewer");
    await viewer.goto(base + "/traces/" + traces[0]);
    await viewer.getByText("Bodies are not shown").waitFor();
    assert.equal(await viewer.getByText("heron").count(), 0);
    await shot(viewer, "trace-as-viewer");
    await viewer.close();
  });

  await t.test("another organization's user cannot open this one's trace", async () => {
    const other = await browser.newContext();
    const page = await other.newPage();
    await register(page, "Hooli", "gavin@hooli.test");
    const response = await page.goto(base + "/traces/" + traces[0]);
    assert.equal(response.status(), 404);
    await page.getByText("No such trace").waitFor();
    assert.equal(await page.getByText("heron").count(), 0);
    await other.close();
  });

  await context.close();
});
