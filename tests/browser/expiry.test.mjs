// A session that expires while its page is open (the server runs with a 2 s session TTL): the
// next page asks to sign in again, a widget says so in its place, and signing in again brings the
// viewer back where they were. Run by tests/browser.rs.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { createRequire } from "node:module";
import { join } from "node:path";

const { chromium } = createRequire(import.meta.url)("playwright-core");
const base = process.env.LOOM_URL;
const password = "correct horse battery staple";
let browser;

before(async () => {
  browser = await chromium.launch({
    executablePath: process.env.LOOM_CHROMIUM || "/usr/bin/chromium",
    args: ["--no-sandbox", "--disable-gpu"],
  });
});
after(async () => browser?.close());

test("an expired session is refused clearly, and signing in again leads back", async () => {
  const page = await browser.newPage();
  await page.goto(base + "/register");
  await page.getByLabel("Organization").fill("Shortlived");
  await page.getByLabel("Email").fill("ada@short.test");
  await page.getByLabel("Password").fill(password);
  await page.getByRole("button", { name: "Register" }).click();
  await page.waitForURL(base + "/");
  await page.waitForTimeout(2500);
  // A widget asked for now says the session ended, in its place.
  const status = await page.evaluate(async () => (await fetch("/ui/home/kpis")).status);
  assert.equal(status, 401);
  // The next page asks to sign in, and leads back after.
  await page.goto(base + "/traces?window=7d");
  assert.equal(new URL(page.url()).pathname, "/signin");
  await page.getByText("Your session has ended: sign in again.").waitFor();
  await page.screenshot({ path: join(process.env.LOOM_ARTIFACTS, "signin-expired.png") });
  await page.getByLabel("Email").fill("ada@short.test");
  await page.getByLabel("Password").fill(password);
  await page.getByRole("button", { name: "Sign in", exact: true }).click();
  await page.waitForURL(/\/traces\?window=7d$/);
  await page.close();
});
