// End-to-end test of the web client in headless Chromium (driven by playwright-core).
//
// Run by tests/test_web_e2e.py, which starts the realm and its web listener and passes:
//   BASE_URL      http://127.0.0.1:PORT
//   ARTIFACTS     directory for screenshots
//   PLAYWRIGHT    path of the playwright-core package
//   CHROMIUM      the browser binary (Debian's /usr/bin/chromium)
//   PASSWORD      the password of the pre-created users alice and bob
//   UPLOAD        (optional) a file alice sends bob; bob downloads it, bytes compared
// It prints "DROP <user>" when the test process should cut that user's WebSockets (to
// check a reconnect that resumes), and exits non-zero on the first failed check.

import { createHash } from "node:crypto";
import { readFileSync } from "node:fs";

import { browserFor, check, env, login, open, run, shot } from "./common.mjs";

const XSS = '<img src=x onerror="window.__xss=1"> <b>bold?</b> & done';

async function send(u, text) {
  await u.page.fill("#text", text);
  await u.page.press("#text", "Enter");
}

async function waitMessage(u, body) {
  await u.page.waitForFunction((b) =>
    [...document.querySelectorAll("#messages li.msg:not(.pending) .body")].some((n) => n.textContent === b), body);
}

async function bodies(u) {
  return u.page.$$eval("#messages li.msg:not(.pending) .body", (ns) => ns.map((n) => n.textContent));
}

async function badge(u, addr) {
  return u.page.$eval(`#conversations li[data-addr="${addr}"]`, (li) => {
    const b = li.querySelector(".badge");
    return b ? b.textContent : "";
  }).catch(() => null);
}

async function main() {
  const started = Date.now();
  const alice = await browserFor("alice");
  const bob = await browserFor("bob");
  await Promise.all([login(alice), login(bob)]);
  const cookies = await alice.context.cookies();
  const c = cookies.find((k) => k.name === "chatproto_session");
  check(c && c.httpOnly && c.sameSite === "Strict", "session cookie is HttpOnly and SameSite=Strict");
  check(await alice.page.evaluate(() => !document.cookie.includes("chatproto_session")),
    "page scripts cannot read the session cookie");

  // a user that does not exist: refused when the conversation is opened, not after a send
  await alice.page.fill("#open-input", "nobody");
  await alice.page.press("#open-input", "Enter");
  await alice.page.waitForFunction(() => document.querySelector("#open-error").textContent !== "");
  check((await alice.page.textContent("#open-error")).includes("nobody"), "opening a conversation with no such user says so");
  check((await alice.page.$('#conversations li[data-addr="nobody@localhost"]')) === null, "and opens no conversation");

  // a new conversation shows the other user's presence at once (bob is online)
  await open(alice, "bob");
  await alice.page.waitForFunction(() => document.querySelector("#conv-info").textContent === "online");
  check((await alice.page.textContent("#open-error")) === "", "the error is gone once a conversation opens");
  check(true, "a newly opened conversation shows bob online");

  // a DM whose text is markup: shown as those characters, never run
  await send(alice, XSS);
  await waitMessage(alice, XSS);
  await bob.page.waitForSelector('#conversations li[data-addr="alice@localhost"] .badge');
  check((await badge(bob, "alice@localhost")) === "1", "bob sees one unread message from alice");
  await shot(bob, "01-bob-unread");
  await bob.page.click('#conversations li[data-addr="alice@localhost"]');
  await waitMessage(bob, XSS);
  check((await bob.page.$$("#messages img, #messages b")).length === 0, "markup in a message is not parsed");
  check(await bob.page.evaluate(() => window.__xss === undefined), "markup in a message does not run");
  check((await badge(bob, "alice@localhost")) === "", "opening the conversation clears its unread count");
  await send(bob, "hi alice");
  await waitMessage(alice, "hi alice");
  await shot(bob, "02-bob-dm");

  // a group: bob creates it, alice joins, both talk
  await open(bob, "#dev");
  await open(alice, "#dev");
  await send(alice, "hello group");
  await waitMessage(bob, "hello group");
  await send(bob, "hello alice, in the group");
  await waitMessage(alice, "hello alice, in the group");
  check(true, "group messages go both ways");
  await shot(alice, "03-alice-group");

  // presence: alice shows bob online
  await alice.page.click('#conversations li[data-addr="bob@localhost"]');
  await alice.page.waitForFunction(() => document.querySelector("#conv-info").textContent === "online");
  check(true, "alice sees bob online");

  // reconnect: bob's connection is cut; what alice sends meanwhile arrives once
  await bob.page.click('#conversations li[data-addr="alice@localhost"]');
  console.log("DROP bob@localhost");
  await bob.page.waitForFunction(() => document.querySelector("#conn-state").classList.contains("down"));
  for (let i = 1; i <= 3; i++) await send(alice, `while you were away ${i}`);
  await waitMessage(alice, "while you were away 3");
  await bob.page.waitForFunction(() => document.querySelector("#conn-state").textContent === "connected", null, { timeout: 20000 });
  await waitMessage(bob, "while you were away 3");
  const seen = await bodies(bob);
  const expected = [XSS, "hi alice", "while you were away 1", "while you were away 2", "while you were away 3"];
  check(JSON.stringify(seen) === JSON.stringify(expected), `bob resumed without loss or duplicates: ${JSON.stringify(seen)}`);
  await shot(bob, "04-bob-resumed");

  // history paging after a reload: the page starts empty and pages back
  await bob.page.reload();
  await bob.page.waitForFunction(() => document.querySelector("#conn-state").textContent === "connected");
  await bob.page.click('#conversations li[data-addr="alice@localhost"]');
  // the history page and any unacknowledged backlog arrive in either order
  await bob.page.waitForFunction((want) => JSON.stringify(
    [...document.querySelectorAll("#messages li.msg:not(.pending) .body")].map((n) => n.textContent)) === want,
    JSON.stringify(expected)).catch(() => {});
  check(JSON.stringify(await bodies(bob)) === JSON.stringify(expected), "after a reload the conversation comes back from history");
  // carol wrote 60 messages before the run: the newest page, then "Load older"
  await bob.page.click('#conversations li[data-addr="carol@localhost"]');
  await bob.page.waitForSelector("#older:not([hidden])");
  const firstPage = (await bodies(bob)).length;
  check(firstPage >= 50 && firstPage <= 60, `the first page holds the newest messages (${firstPage})`);
  await bob.page.click("#older");
  await waitMessage(bob, "note 1");
  const notes = await bodies(bob);
  check(notes.length === 60 && notes.every((b, i) => b === `note ${i + 1}`), "older history pages in, in order, once");
  check(await bob.page.$eval("#older", (b) => b.hidden), "no older page after the first message");

  if (env.UPLOAD) {
    const original = readFileSync(env.UPLOAD);
    const digest = createHash("sha256").update(original).digest("hex");
    await alice.page.click('#conversations li[data-addr="bob@localhost"]');
    // the upload row (progress bar) comes and goes: record what it showed
    await alice.page.evaluate(() => {
      window.__progress = -1;
      new MutationObserver(() => {
        for (const p of document.querySelectorAll("#uploads progress")) {
          window.__progress = Math.max(window.__progress, Number(p.value));
        }
      }).observe(document.querySelector("#uploads"), { subtree: true, childList: true, attributes: true });
    });
    await alice.page.setInputFiles("#file-input", env.UPLOAD);
    const link = '#messages li.msg .file a';
    await alice.page.waitForSelector(link);
    check(await alice.page.evaluate(() => window.__progress) >= 0, "the upload showed a progress bar");
    check(await alice.page.evaluate(() => document.querySelectorAll("#uploads .error").length === 0), "the upload succeeded");
    await shot(alice, "05-alice-file-sent");
    await bob.page.waitForSelector('#conversations li[data-addr="alice@localhost"] .badge');
    await bob.page.click('#conversations li[data-addr="alice@localhost"]');
    await bob.page.waitForSelector(link);
    await shot(bob, "06-bob-file");
    const [download] = await Promise.all([bob.page.waitForEvent("download"), bob.page.click(link)]);
    const path = await download.path();
    const got = readFileSync(path);
    const gotDigest = createHash("sha256").update(got).digest("hex");
    check(got.length === original.length && gotDigest === digest,
      `bob downloaded alice's file, ${got.length} bytes, sha256 ${gotDigest.slice(0, 16)}…`);
  }
  console.log(`e2e finished in ${((Date.now() - started) / 1000).toFixed(1)} s`);
}

run("", main);
