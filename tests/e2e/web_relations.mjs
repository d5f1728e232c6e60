// End-to-end test of replies, reactions, edits and deletes in the web client (issue 17),
// in headless Chromium driven by playwright-core.
//
// Run by tests/test_web_relations_e2e.py with BASE_URL, ARTIFACTS, PLAYWRIGHT, CHROMIUM
// and PASSWORD (of the pre-created users alice and bob), as tests/e2e/web_e2e.mjs.

import { browserFor, check, login, open, run, shot } from "./common.mjs";

// The message whose text is `body` (its li), once it is shown.
async function message(u, body) {
  await u.page.waitForFunction((b) =>
    [...document.querySelectorAll("#messages li.msg:not(.pending) .body")].some((n) => n.textContent === b), body);
  return u.page.locator("#messages li.msg:not(.pending)", { has: u.page.locator(".body", { hasText: body }) }).last();
}

async function action(u, li, cls) {
  await li.hover();
  await li.locator(`.actions button.${cls}`).first().click();
}

async function main() {
  const alice = await browserFor("alice");
  const bob = await browserFor("bob");
  await Promise.all([login(alice), login(bob)]);
  await open(alice, "bob");
  await open(bob, "alice");
  await alice.page.fill("#text", "lunch at noon?");
  await alice.page.press("#text", "Enter");
  const asked = await message(bob, "lunch at noon?");

  // bob replies: the reply shows the message it answers, on both pages
  await action(bob, asked, "reply");
  check(await bob.page.isVisible("#compose-bar"), "Reply shows what the message answers");
  await bob.page.fill("#text", "yes, see you there");
  await bob.page.press("#text", "Enter");
  for (const u of [alice, bob]) {
    const reply = await message(u, "yes, see you there");
    await u.page.waitForFunction(() =>
      [...document.querySelectorAll("#messages blockquote.quote")].some((q) => q.textContent === "alice: lunch at noon?"));
    check((await reply.locator("blockquote.quote").textContent()) === "alice: lunch at noon?",
      `${u.name} sees the reply quoting alice's message`);
  }
  check(await bob.page.isHidden("#compose-bar"), "the reply bar goes once sent");

  // alice reacts to the reply; bob sees the count, then alice takes it back
  const reply = await message(alice, "yes, see you there");
  await action(alice, reply, 'react[data-emoji="👍"]');
  await bob.page.waitForFunction(() =>
    [...document.querySelectorAll("#messages .reaction")].some((r) => r.textContent === "👍 1"));
  check(true, "bob sees alice's 👍 on his reply");
  await action(bob, await message(bob, "yes, see you there"), 'react[data-emoji="👍"]');
  await alice.page.waitForFunction(() =>
    [...document.querySelectorAll("#messages .reaction")].some((r) => r.textContent === "👍 2" && r.classList.contains("mine")));
  check(true, "two 👍, alice's own marked");
  await shot(alice, "relations-01-reactions");
  await alice.page.click('#messages .reaction.mine');
  await bob.page.waitForFunction(() =>
    [...document.querySelectorAll("#messages .reaction")].some((r) => r.textContent === "👍 1" && r.classList.contains("mine")));
  check(true, "alice took her 👍 back (clicking her reaction)");

  // more reactions: the picker (all of it from this page), and taking one back there
  const hasReaction = (u, text) => u.page.waitForFunction((t) =>
    [...document.querySelectorAll("#messages .reaction")].some((r) => r.textContent === t), text);
  await action(alice, await message(alice, "yes, see you there"), "pick");
  await alice.page.waitForSelector("#emoji-picker");
  const picks = await alice.page.$$eval("#emoji-picker .pick-emoji", (b) => b.length);
  check(picks >= 48, `the picker offers ${picks} emoji`);
  await shot(alice, "relations-01b-picker");
  await alice.page.click('#emoji-picker .pick-emoji[data-emoji="🎉"]');
  check((await alice.page.$("#emoji-picker")) === null, "choosing closes the picker");
  await hasReaction(bob, "🎉 1");
  check(true, "bob sees alice's 🎉 from the picker");
  await action(alice, await message(alice, "yes, see you there"), "pick");
  await alice.page.waitForSelector('#emoji-picker .pick-emoji.mine[data-emoji="🎉"][aria-pressed="true"]');
  check(true, "the picker marks alice's own 🎉");
  await alice.page.keyboard.press("Escape");
  await alice.page.waitForSelector("#emoji-picker", { state: "detached" });
  check(true, "Escape closes the picker");
  await action(alice, await message(alice, "yes, see you there"), "pick");
  await alice.page.click('#emoji-picker .pick-emoji.mine[data-emoji="🎉"]');
  await bob.page.waitForFunction(() =>
    ![...document.querySelectorAll("#messages .reaction")].some((r) => r.textContent.startsWith("🎉")));
  check(true, "alice took her 🎉 back in the picker");
  await action(bob, await message(bob, "yes, see you there"), "pick");
  await bob.page.mouse.click(5, 5);  // elsewhere
  await bob.page.waitForSelector("#emoji-picker", { state: "detached" });
  check(true, "a click elsewhere closes the picker");
  const foreign = await alice.page.evaluate(() => performance.getEntriesByType("resource")
    .map((e) => e.name).filter((n) => !n.startsWith(location.origin)));
  check(foreign.length === 0, "nothing was fetched from another origin");

  // alice edits her message: "(edited)" and the new text everywhere, quote included
  await action(alice, await message(alice, "lunch at noon?"), "edit");
  check((await alice.page.inputValue("#text")) === "lunch at noon?", "Edit puts the text in the composer");
  await alice.page.fill("#text", "lunch at one?");
  await alice.page.press("#text", "Enter");
  const edited = await message(bob, "lunch at one?");
  check((await edited.locator(".edited").textContent()) === "(edited)", "bob sees alice's message (edited)");
  await bob.page.waitForFunction(() =>
    [...document.querySelectorAll("#messages blockquote.quote")].some((q) => q.textContent === "alice: lunch at one?"));
  check(true, "the quote in bob's reply follows the edit");
  check((await bob.page.$$eval("#messages li.msg .actions button.edit", (b) => b.length)) === 1,
    "bob may edit only his own message");

  // alice deletes it (two clicks): gone on both pages, after a reload too
  const mine = await message(alice, "lunch at one?");
  await action(alice, mine, "delete");
  await mine.locator(".actions button.delete.confirm").click();
  await bob.page.waitForSelector("#messages li.msg.deleted .gone");
  check(!(await bob.page.textContent("#messages")).includes("lunch at one"), "the deleted text is gone from bob's page");
  await bob.page.reload();
  await bob.page.waitForFunction(() => document.querySelector("#conn-state").textContent === "connected");
  await bob.page.click('#conversations li[data-addr="alice@localhost"]');
  await bob.page.waitForSelector("#messages li.msg.deleted .gone");
  await message(bob, "yes, see you there");
  check(!(await bob.page.textContent("#messages")).includes("lunch at"), "history after a reload shows it deleted");
  check((await bob.page.textContent("#messages blockquote.quote")) === "alice: message deleted",
    "and the reply's quote says so");
  check((await bob.page.$$eval("#messages .reaction", (r) => r.map((x) => x.textContent))).join() === "👍 1",
    "history after a reload has the reactions");
  await shot(bob, "relations-02-deleted");
  console.log("e2e relations finished");
}

run("relations-", main);
