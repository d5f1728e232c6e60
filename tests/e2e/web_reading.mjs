// End-to-end test of reading in the web client (headless Chromium, playwright-core):
// the sidebar a fresh browser gets from the realm's conversation list (unread counts,
// mentions), read markers synced to another browser and shown to the other party
// ("seen"), typing notices, and the search box.
//
// Run by tests/test_web_reading_e2e.py, with the environment of tests/e2e/web_e2e.mjs.
// Before it runs: bob sent alice three messages (the last "lunch at noon?"), carol
// wrote "hi @alice" in #dev, which alice is in.

import { mkdtempSync, rmSync, mkdirSync } from "node:fs";
import { createRequire } from "node:module";
import { tmpdir } from "node:os";
import { join } from "node:path";

const env = process.env;
const require = createRequire(import.meta.url);
const { chromium } = require(env.PLAYWRIGHT);
const BASE = env.BASE_URL;
const ART = env.ARTIFACTS;
mkdirSync(ART, { recursive: true });
const TIMEOUT = 15000;
const profiles = [];
const contexts = [];

function check(cond, what) {
  if (!cond) throw new Error(`check failed: ${what}`);
  console.log(`ok - ${what}`);
}

async function browserFor(name, label) {
  const dir = mkdtempSync(join(tmpdir(), `chatproto-e2e-${label}-`));
  profiles.push(dir);
  const context = await chromium.launchPersistentContext(dir, {
    executablePath: env.CHROMIUM,
    headless: true,
    viewport: { width: 1100, height: 720 },
    args: [
      "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync",
    ],
  });
  contexts.push(context);
  context.setDefaultTimeout(TIMEOUT);
  const page = context.pages()[0] || (await context.newPage());
  page.on("pageerror", (e) => { console.log(`[${label}] page error: ${e.message}`); process.exitCode = 1; });
  return { name, label, context, page };
}

async function login(u) {
  await u.page.goto(BASE);
  await u.page.fill("#login-user", u.name);
  await u.page.fill("#login-password", env.PASSWORD);
  await u.page.click("#login-button");
  await u.page.waitForFunction(() => document.querySelector("#conn-state").textContent === "connected");
}

function badges(u, addr) {
  return u.page.$eval(`#conversations li[data-addr="${addr}"]`,
    (li) => [...li.querySelectorAll(".badge")].map((b) => b.textContent).join(" ")).catch(() => null);
}

async function waitBadges(u, addr, want) {
  await u.page.waitForFunction(([a, w]) => {
    const li = document.querySelector(`#conversations li[data-addr="${a}"]`);
    return li && [...li.querySelectorAll(".badge")].map((b) => b.textContent).join(" ") === w;
  }, [addr, want]);
}

async function shot(u, label) {
  await u.page.screenshot({ path: join(ART, `reading-${label}.png`) });
}

async function main() {
  const laptop = await browserFor("alice", "alice-laptop");
  const bob = await browserFor("bob", "bob");
  let phone = null;
  try {
    // a fresh browser: its sidebar comes from the realm, with the realm's counts
    await login(laptop);
    await waitBadges(laptop, "bob@localhost", "3");
    await waitBadges(laptop, "#dev@localhost", "@1 1");
    check(true, "a fresh browser lists bob (3 unread) and #dev (1 unread, 1 mention) from the realm");
    await shot(laptop, "01-fresh-sidebar");

    // the mention is highlighted in the group
    await laptop.page.click('#conversations li[data-addr="#dev@localhost"]');
    await laptop.page.waitForSelector("#messages li.msg.mention");
    check((await laptop.page.textContent("#messages li.msg.mention .body")) === "hi @alice",
      "the message mentioning alice is highlighted");

    // alice reads bob's messages; bob, in his conversation with alice, sees "seen"
    await login(bob);
    await bob.page.click('#conversations li[data-addr="alice@localhost"]');
    await laptop.page.click('#conversations li[data-addr="bob@localhost"]');
    await bob.page.waitForFunction(() => document.querySelector("#conv-seen").textContent === "seen");
    check(true, "bob sees that alice has read his messages");
    await shot(bob, "02-bob-seen");

    // typing: alice types, bob sees it
    await laptop.page.type("#text", "on my way");
    await bob.page.waitForFunction(() => document.querySelector("#conv-typing").textContent === "alice is typing…");
    check(true, "bob sees alice typing");
    await shot(bob, "03-bob-typing");

    // another browser of alice's: the counts are the realm's, read already
    phone = await browserFor("alice", "alice-phone");
    await login(phone);
    await waitBadges(phone, "#dev@localhost", "");
    await waitBadges(phone, "bob@localhost", "");
    check(true, "alice's other browser shows what she read on the laptop as read");

    // search: what alice may read, newest first; a result opens its conversation
    await phone.page.fill("#search-input", "LUNCH");
    await phone.page.press("#search-input", "Enter");
    await phone.page.waitForSelector("#search-results:not([hidden]) li[data-addr]");
    const found = await phone.page.$$eval("#search-results li[data-addr] .body", (ns) => ns.map((n) => n.textContent));
    check(JSON.stringify(found) === JSON.stringify(["bob: lunch at noon?"]), `search finds bob's message: ${JSON.stringify(found)}`);
    await shot(phone, "04-search");
    await phone.page.click("#search-results li[data-addr]");
    await phone.page.waitForFunction(() => document.querySelector("#conv-title").textContent === "bob");
    check(true, "a search result opens its conversation");
    await phone.page.fill("#search-input", "zebra");
    await phone.page.press("#search-input", "Enter");
    await phone.page.waitForSelector("#search-results li.none");
    check(true, "a search with no result says so");
    console.log("e2e reading finished");
  } catch (err) {
    for (const u of [laptop, bob, phone]) if (u) await shot(u, `failure-${u.label}`).catch(() => {});
    throw err;
  } finally {
    for (const c of contexts) await c.close().catch(() => {});
    for (const d of profiles) rmSync(d, { recursive: true, force: true });
  }
}

main().catch((err) => { console.log(`not ok - ${err.stack || err}`); process.exit(1); });
