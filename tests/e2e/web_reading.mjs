// End-to-end test of reading in the web client (headless Chromium, playwright-core):
// the sidebar a fresh browser gets from the realm's conversation list (unread counts,
// mentions), read markers synced to another browser and shown to the other party
// ("seen"), typing notices, and the search box.
//
// Run by tests/test_web_reading_e2e.py, with the environment of tests/e2e/common.mjs.
// Before it runs: bob sent alice three messages (the last "lunch at noon?"), carol
// wrote "hi @alice" in #dev, which alice is in, and sent alice "standup at ten".

import { browserFor, check, login, run, shot as save } from "./common.mjs";

async function waitBadges(u, addr, want) {
  await u.page.waitForFunction(([a, w]) => {
    const li = document.querySelector(`#conversations li[data-addr="${a}"]`);
    return li && [...li.querySelectorAll(".badge")].map((b) => b.textContent).join(" ") === w;
  }, [addr, want]);
}

async function shot(u, label) {
  await save(u, `reading-${label}`);
}

async function main() {
  const laptop = await browserFor("alice-laptop", "alice");
  const bob = await browserFor("bob");
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
  const phone = await browserFor("alice-phone", "alice");
  await login(phone);
  // carol's message, which no browser opened, is still unread: the realm's list is in
  // (bob and #dev, with no badge, could otherwise be shown before it came)
  await waitBadges(phone, "carol@localhost", "1");
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
}

run("reading-", main);
