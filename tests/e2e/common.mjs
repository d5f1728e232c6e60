// What the Chromium scripts of tests/e2e share: the environment, checks, one browser per
// user (a persistent context in a temporary profile), logging in, screenshots, and the
// run that screenshots every browser on a failure and always closes them.
//
// The scripts import it as "./common.mjs" (resolved next to the importing script, so
// the directory node runs in does not matter).  Their environment, set by run_script in
// tests/test_web_e2e.py:
//   BASE_URL      http://127.0.0.1:PORT
//   ARTIFACTS     directory for screenshots
//   PLAYWRIGHT    path of the playwright-core package
//   CHROMIUM      the browser binary (Debian's /usr/bin/chromium)
//   PASSWORD      the password of the pre-created users

import { mkdtempSync, mkdirSync, rmSync } from "node:fs";
import { createRequire } from "node:module";
import { tmpdir } from "node:os";
import { join } from "node:path";

export const env = process.env;
const require = createRequire(import.meta.url);
const { chromium } = require(env.PLAYWRIGHT);
export const BASE = env.BASE_URL;
export const ART = env.ARTIFACTS;
mkdirSync(ART, { recursive: true });
export const TIMEOUT = 15000;
const profiles = [];
const browsers = [];

export function check(cond, what) {
  if (!cond) throw new Error(`check failed: ${what}`);
  console.log(`ok - ${what}`);
}

// A browser of its own for `label` (its log and screenshot name), logging in as `user`
// (default: `label`).  An unexpected dialog or a page error fails the run.
export async function browserFor(label, user = label) {
  const dir = mkdtempSync(join(tmpdir(), `chatproto-e2e-${label}-`));
  profiles.push(dir);
  const context = await chromium.launchPersistentContext(dir, {
    executablePath: env.CHROMIUM,
    headless: true,
    acceptDownloads: true,
    viewport: { width: 1100, height: 720 },
    args: [
      "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync",
    ],
  });
  context.setDefaultTimeout(TIMEOUT);
  const page = context.pages()[0] || (await context.newPage());
  page.on("dialog", async (d) => { await d.dismiss(); throw new Error(`unexpected dialog: ${d.message()}`); });
  page.on("pageerror", (e) => { console.log(`[${label}] page error: ${e.message}`); process.exitCode = 1; });
  page.on("console", (m) => { if (m.type() === "error") console.log(`[${label}] console: ${m.text()}`); });
  const u = { name: user, user, label, context, page };
  browsers.push(u);
  return u;
}

export async function connected(u, timeout = TIMEOUT) {
  await u.page.waitForFunction(() => document.querySelector("#conn-state").textContent === "connected", null, { timeout });
}

export async function login(u) {
  await u.page.goto(BASE);
  await u.page.fill("#login-user", u.user);
  await u.page.fill("#login-password", env.PASSWORD);
  await u.page.click("#login-button");
  await u.page.waitForSelector("#chat-view:not([hidden])");
  await connected(u);
  check(true, `${u.label} logged in and connected`);
}

// Opens the conversation with `text` (a user or a group) from the "open" box.
export async function open(u, text) {
  await u.page.fill("#open-input", text);
  await u.page.press("#open-input", "Enter");
  await u.page.waitForFunction((t) => document.querySelector("#conv-title").textContent === t, text);
}

export async function shot(u, name) {
  await u.page.screenshot({ path: join(ART, `${name}.png`) });
}

// Runs `main`; on a failure screenshots every browser (`${prefix}failure-${label}`),
// prints "not ok" and exits 1.  The browsers are closed and their profiles removed
// either way.
export async function run(prefix, main) {
  let failed = null;
  try {
    await main();
  } catch (err) {
    failed = err;
    for (const u of browsers) await shot(u, `${prefix}failure-${u.label}`).catch(() => {});
  } finally {
    for (const u of browsers) await u.context.close().catch(() => {});
    for (const d of profiles) rmSync(d, { recursive: true, force: true });
  }
  if (failed !== null) {
    console.log(`not ok - ${failed.stack || failed}`);
    process.exit(1);
  }
}
