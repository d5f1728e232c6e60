// End-to-end test of durable browser logins in headless Chromium (playwright-core).
//
// Run by tests/test_web_e2e.py, which starts a realm and its web listener and passes
// BASE_URL, ARTIFACTS, PLAYWRIGHT, CHROMIUM and PASSWORD (users alice and bob exist).
// Alice logs in from two browsers; the script prints "RESTART" and the test process
// stops the realm and starts a new one on the same store and port.  Both browsers must
// stay logged in (reconnecting by their cookie, no password asked), and a reload too.
// Then "Log out everywhere" in one browser logs the other out as well.

import { browserFor, check, connected, login, open, run, shot } from "./common.mjs";

async function cookie(u) {
  const c = (await u.context.cookies()).find((k) => k.name === "chatproto_session");
  return c ? c.value : null;
}

async function main() {
  const desk = await browserFor("desk", "alice");
  const phone = await browserFor("phone", "alice");
  await login(desk);
  await login(phone);
  const before = await cookie(desk);

  console.log("RESTART");
  for (const u of [desk, phone]) {
    await u.page.waitForFunction(() => document.querySelector("#conn-state").classList.contains("down"));
  }
  check(true, "both browsers saw the realm go away");
  for (const u of [desk, phone]) await connected(u, 45000);
  check(await desk.page.$eval("#login-view", (v) => v.hidden), "the desk browser reconnected without a login");
  check(await phone.page.$eval("#login-view", (v) => v.hidden), "the phone browser reconnected without a login");
  check((await cookie(desk)) === before, "with the cookie it had before the restart");

  // the session works: a message to bob is sent and shown
  await open(desk, "bob");
  await desk.page.fill("#text", "written after the restart");
  await desk.page.press("#text", "Enter");
  await desk.page.waitForFunction(() => [...document.querySelectorAll("#messages li.msg:not(.pending) .body")]
    .some((n) => n.textContent === "written after the restart"));
  check(true, "a message is sent after the restart");

  // a reload (a new page load asks GET /api/session) is still logged in
  await desk.page.reload();
  await desk.page.waitForSelector("#chat-view:not([hidden])");
  await connected(desk);
  check(true, "after a reload the desk browser is still logged in");
  await shot(desk, "restart-01-desk-logged-in");

  // log out everywhere: the phone is logged out too
  await desk.page.click("#logout-all");
  await desk.page.waitForSelector("#login-view:not([hidden])");
  const note = await desk.page.textContent("#login-error");
  check(note.includes("2 browser logins ended"), `the desk browser says so: ${note}`);
  await phone.page.waitForSelector("#login-view:not([hidden])", { timeout: 30000 });
  check(true, "the phone browser was logged out");
  await phone.page.reload();
  await phone.page.waitForSelector("#login-view:not([hidden])");
  check(await phone.page.$eval("#chat-view", (v) => v.hidden), "and stays logged out after a reload");
  await shot(phone, "restart-02-phone-logged-out");
  console.log("e2e restart finished");
}

run("restart-", main);
