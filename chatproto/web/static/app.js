// chatproto browser client: the native protocol (PROTOCOL.md) over a WebSocket.
//
// One JSON frame per WebSocket text message.  The session cookie (HttpOnly, set by
// POST /api/login) authenticates the WebSocket, so this script never keeps a password.
// Every piece of user data is put in the page with textContent / DOM properties, never
// as HTML.  Reconnects resume with `since` = the last processed stream position and
// drop anything at or below it, so nothing is lost or shown twice; sends carry a nonce
// and are retried with it after a reconnect (the realm answers a repeated nonce with
// the first send's result instead of storing it again).

import { hashBlob } from "./sha256.js";

const $ = (id) => document.getElementById(id);
const HISTORY_PAGE = 50;

const state = {
  me: null,            // "alice@realm"
  realm: null,
  ws: null,
  live: false,         // logged in and synced
  lastPos: 0,          // highest stream position processed (de-duplication, resume)
  ackedPos: 0,
  ackTimer: null,
  nextId: 1,
  pending: new Map(),  // request id -> {resolve, reject}
  outbox: [],          // sends not yet answered: {to, body, nonce, replyTo}
  compose: null,       // {mode: "reply" | "edit", env}: what Enter does besides sending
  conversations: new Map(), // address -> conversation
  active: null,        // address of the open conversation
  presence: new Map(), // user -> status
  retry: 0,
  retryTimer: null,
  stopped: true,
  limits: {},
  typingTimers: new Map(), // conversation -> timer hiding its "typing" line
  typingSent: 0,           // when this page last told the realm the user is typing
  readTimer: null,
  lastMark: 0,             // when this page last sent a read marker
};

const TYPING_EVERY = 3000; // ms between typing notices while typing
const TYPING_SHOWN = 6000; // ms a typing notice is shown (PROTOCOL.md, typing)

// ---- small DOM helpers ---------------------------------------------------------------

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k === "dataset") Object.assign(node.dataset, v);
    else if (k.includes("-")) node.setAttribute(k, v);
    else node[k] = v;
  }
  for (const c of children) if (c != null) node.append(c);
  return node;
}

function showError(id, text) { $(id).textContent = text || ""; }

function fmtTime(ts) {
  const d = new Date(ts * 1000);
  const today = new Date().toDateString() === d.toDateString();
  return today ? d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" })
    : d.toLocaleString([], { dateStyle: "short", timeStyle: "short" });
}

function fmtSize(n) {
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KiB`;
  return `${(n / 1024 / 1024).toFixed(1)} MiB`;
}

function randomId() {
  const a = new Uint8Array(12);
  crypto.getRandomValues(a);
  return Array.from(a, (b) => b.toString(16).padStart(2, "0")).join("");
}

function deviceName() {
  let d = localStorage.getItem("chatproto.device");
  if (!d) { d = "web-" + randomId().slice(0, 10); localStorage.setItem("chatproto.device", d); }
  return d;
}

function shortName(addr) {
  if (!state.realm) return addr;
  const suffix = "@" + state.realm;
  return addr.endsWith(suffix) ? addr.slice(0, -suffix.length) : addr;
}

// ---- HTTP API (session cookie) -------------------------------------------------------

async function api(path, body) {
  const init = body === undefined ? { method: "GET" } : {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  };
  init.credentials = "same-origin";
  const res = await fetch(path, init);
  let data = {};
  try { data = await res.json(); } catch { /* empty body */ }
  if (!res.ok) {
    const err = new Error(data.message || res.statusText);
    err.code = data.code || String(res.status);
    throw err;
  }
  return data;
}

// ---- conversations -------------------------------------------------------------------

function conversationOf(env) {
  if (env.to.startsWith("#")) return env.to;
  return env.from === state.me ? env.to : env.from;
}

function getConversation(addr) {
  let c = state.conversations.get(addr);
  if (!c) {
    c = { addr, group: addr.startsWith("#"), items: new Map(), byId: new Map(), unread: 0,
          mentions: 0, historyLoaded: false, hasOlder: true, lastTs: 0, read: 0, marked: 0,
          peerRead: 0, typing: "" };
    state.conversations.set(addr, c);
    saveConversations();
  }
  return c;
}

function storageKey() { return `chatproto.conversations.${state.me}`; }

function saveConversations() {
  if (!state.me) return;
  const list = [...state.conversations.values()].map((c) => [c.addr, c.lastTs]);
  localStorage.setItem(storageKey(), JSON.stringify(list));
}

function loadConversations() {
  try {
    const list = JSON.parse(localStorage.getItem(storageKey()) || "[]");
    for (const [addr, lastTs] of list) if (typeof addr === "string") getConversation(addr).lastTs = lastTs || 0;
  } catch { /* ignore a damaged entry */ }
}

const REF_KINDS = new Set(["reaction", "edit", "delete"]);

function addItem(conv, env) {
  if (REF_KINDS.has(env.kind)) return applyRef(conv, env);
  if (conv.items.has(env.pos)) return false;
  conv.items.set(env.pos, env);
  conv.byId.set(env.msg_id, env.pos);
  if (env.ts > conv.lastTs) conv.lastTs = env.ts;
  return true;
}

// A reaction, edit or delete changes the item it refers to (PROTOCOL.md, "Items that
// refer to items"); one whose item is not loaded is dropped (history shows it as it is).
function applyRef(conv, ref) {
  const m = ref.meta || {};
  const pos = conv.byId.get(m.ref);
  const target = pos === undefined ? null : conv.items.get(pos);
  if (!target) return false;
  const tm = { ...(target.meta || {}) };
  if (tm.deleted) return false;
  let body = target.body;
  if (ref.kind === "delete") {
    conv.items.set(pos, { ...target, body: "", meta: { deleted: true } });
    return true;
  }
  if (ref.kind === "edit") {
    if (ref.from !== target.from) return false;
    body = ref.body;
    tm.edited = ref.ts;
  } else {
    const reactions = {};
    for (const [e, users] of Object.entries(tm.reactions || {})) reactions[e] = [...users];
    const users = reactions[m.emoji] || (reactions[m.emoji] = []);
    const at = users.indexOf(ref.from);
    if (m.remove) { if (at >= 0) users.splice(at, 1); } else if (at < 0) users.push(ref.from);
    if (!users.length) delete reactions[m.emoji];
    tm.reactions = reactions;
    if (!Object.keys(reactions).length) delete tm.reactions;
  }
  conv.items.set(pos, { ...target, body, meta: tm });
  return true;
}

// ---- WebSocket session ---------------------------------------------------------------

function request(type, fields = {}) {
  return new Promise((resolve, reject) => {
    const ws = state.ws;
    if (!ws || ws.readyState !== WebSocket.OPEN) {
      const err = new Error("not connected"); err.code = "disconnected"; reject(err); return;
    }
    const id = state.nextId++;
    state.pending.set(id, { resolve, reject });
    ws.send(JSON.stringify({ type, id, ...fields }));
  });
}

function sendFrame(obj) {
  if (state.ws && state.ws.readyState === WebSocket.OPEN) state.ws.send(JSON.stringify(obj));
}

function setConn(text, down = false) {
  const c = $("conn-state");
  c.textContent = text;
  c.classList.toggle("down", down);
}

function connect() {
  clearTimeout(state.retryTimer);
  state.stopped = false;
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const ws = new WebSocket(`${scheme}//${location.host}/ws`);
  state.ws = ws;
  state.live = false;
  setConn(state.retry ? "reconnecting…" : "connecting…");
  ws.onopen = () => startSession(ws);
  ws.onmessage = (ev) => { if (ws === state.ws) onFrame(JSON.parse(ev.data)); };
  ws.onclose = () => { if (ws === state.ws) onClosed(); };
}

async function startSession(ws) {
  try {
    const hello = await request("hello", { version: 1 });
    state.realm = hello.realm;
    state.limits = hello.limits || {};
    const login = { device: deviceName() };
    if (state.lastPos > 0) login.since = state.lastPos;
    const res = await request("login", login);
    state.me = res.user;
    $("me").textContent = shortName(res.user);
    $("me").title = res.user;
  } catch (err) {
    if (ws !== state.ws) return;
    if (err.code === "auth_failed") { stop(); showLogin("Please log in."); return; }
    setConn(`error: ${err.message}`, true);
  }
}

function onFrame(f) {
  switch (f.type) {
    case "result":
    case "error": {
      const p = f.id != null ? state.pending.get(f.id) : null;
      if (p) {
        state.pending.delete(f.id);
        if (f.type === "result") p.resolve(f);
        else { const e = new Error(f.message); e.code = f.code; e.frame = f; p.reject(e); }
      } else if (f.type === "error") {
        setConn(`closed: ${f.message}`, true);
        if (f.code === "auth_failed") { stop(); showLogin(f.message); }
      }
      break;
    }
    case "msg": onMsg(f); break;
    case "synced": onSynced(f.pos); break;
    case "presence": onPresence(f); break;
    case "read": onRead(f); break;
    case "typing": onTyping(f); break;
    case "tags": // an IRC user's +typing (IRCv3), relayed by the realm as client tags
      if (f.tags && "+typing" in f.tags && f.from !== state.me) {
        onTyping({ with: f.to.startsWith("#") ? f.to : f.from, user: f.from, typing: f.tags["+typing"] !== "done" });
      }
      break;
    case "ping": sendFrame({ type: "pong" }); break;
    default: break; // unknown frames are ignored (PROTOCOL.md)
  }
}

function onMsg(env) {
  if (env.pos <= state.lastPos) return; // already processed (resume overlap)
  state.lastPos = env.pos;
  scheduleAck();
  const addr = conversationOf(env);
  const conv = getConversation(addr);
  if (env.kind === "event" && env.meta && env.meta.event === "deleted") conv.deleted = true;
  if (!addItem(conv, env)) return;
  const visible = addr === state.active && document.visibilityState === "visible";
  if (!visible && env.from !== state.me && (env.kind === "text" || env.kind === "file")) {
    conv.unread++;
    if (mentionsMe(env)) conv.mentions++;
  }
  if (env.from !== state.me && conv.typing) { conv.typing = ""; renderHeader(); }
  if (visible) scheduleRead();
  renderConversations();
  if (addr === state.active) {
    renderMessages({ stick: true });
    if (env.kind === "event" && state.live) loadGroupInfo(conv);
  }
}

function onSynced(pos) {
  if (pos > state.lastPos) state.lastPos = pos;
  state.live = true;
  state.retry = 0;
  setConn("connected");
  saveConversations();
  renderConversations();
  loadConversationList();
  flushOutbox();
  // a status lasts while the user has a session: after a reconnect, set it again
  if ($("status").value !== "online") request("set_status", { status: $("status").value }).catch(() => {});
  if (state.active) openConversation(state.active);
}

function onPresence(f) {
  state.presence.set(f.user, f.status);
  renderConversations();
  renderHeader();
}

// The realm keeps the conversation list, the read markers and the unread counts: a new
// browser shows the same sidebar as the old one (PROTOCOL.md, conversations).
async function loadConversationList() {
  try {
    const res = await request("conversations");
    for (const entry of res.conversations) {
      const c = getConversation(entry.with);
      if (entry.last && entry.last.ts > c.lastTs) c.lastTs = entry.last.ts;
      c.read = Math.max(c.read, entry.read);
      c.marked = Math.max(c.marked, entry.read);
      if (entry.peer_read) c.peerRead = Math.max(c.peerRead, entry.peer_read);
      const visible = c.addr === state.active && document.visibilityState === "visible";
      if (!visible) { c.unread = entry.unread; c.mentions = entry.mentions || 0; }
    }
    saveConversations();
    renderConversations();
    renderHeader();
    if (state.active) scheduleRead();
  } catch { /* offline again: the next sync asks again */ }
}

function newestPos(conv) {
  let top = 0;
  for (const p of conv.items.keys()) if (p > top) top = p;
  return top;
}

// The open conversation is read up to its newest item: tell the realm (once per new
// item, at most once a second), so the user's other devices and the other party know.
function scheduleRead() {
  const addr = state.active;
  if (!addr || !state.live || document.visibilityState !== "visible") return;
  const conv = getConversation(addr);
  const top = newestPos(conv);
  if (top <= conv.marked) return;
  const wait = state.lastMark + 1000 - Date.now();
  if (wait > 0) {
    if (!state.readTimer) {
      state.readTimer = setTimeout(() => { state.readTimer = null; scheduleRead(); }, wait);
    }
    return;
  }
  state.lastMark = Date.now();
  conv.marked = top;
  request("mark_read", { with: addr, pos: top }).catch(() => { conv.marked = 0; });
}

function onRead(f) {
  if (f.user === state.me) { // this user, on another device (or here)
    const conv = getConversation(f.with);
    conv.read = Math.max(conv.read, f.pos);
    conv.marked = Math.max(conv.marked, f.pos);
    if (f.pos >= newestPos(conv)) { conv.unread = 0; conv.mentions = 0; }
    renderConversations();
  } else { // the other party of a private conversation
    const conv = getConversation(f.with);
    conv.peerRead = Math.max(conv.peerRead, f.pos);
    if (f.with === state.active) renderHeader();
  }
}

function onTyping(f) {
  if (f.user === state.me) return;
  const conv = getConversation(f.with);
  clearTimeout(state.typingTimers.get(f.with));
  conv.typing = f.typing ? `${shortName(f.user)} is typing…` : "";
  if (f.typing) {
    state.typingTimers.set(f.with, setTimeout(() => {
      conv.typing = "";
      if (f.with === state.active) renderHeader();
    }, TYPING_SHOWN));
  }
  if (f.with === state.active) renderHeader();
}

function userTyping() {
  const now = Date.now();
  if (!state.active || !state.live || now - state.typingSent < TYPING_EVERY) return;
  state.typingSent = now;
  request("typing", { with: state.active, typing: true }).catch(() => {});
}

// @name of this user in a group message (the realm's rule: chatproto/mentions.py)
function mentionsMe(env) {
  if (env.kind !== "text" || env.from === state.me || !env.to.startsWith("#") || !state.me) return false;
  // (a name is a-z 0-9 . _ -: only its dots need escaping; letters and digits are
  // Unicode's, as Python's \w)
  const name = state.me.slice(0, state.me.lastIndexOf("@")).replace(/\./g, "\\.");
  const w = "\\p{L}\\p{N}_";
  const re = new RegExp(`(?<![${w}.@-])@${name}(?![${w}-])(?!\\.[${w}-])`, "iu");
  return re.test(env.body || "");
}

async function runSearch(query) {
  const box = $("search-results");
  if (!query.trim()) { box.hidden = true; box.replaceChildren(); return; }
  let res;
  try {
    res = await request("search", { query, limit: 20 });
  } catch (err) {
    box.hidden = false;
    box.replaceChildren(el("li", { class: "error", text: err.message }));
    return;
  }
  const items = res.messages.map((env) => {
    const addr = conversationOf(env);
    const li = el("li", { dataset: { pos: String(env.pos), addr } },
      el("span", { class: "where", text: `${shortName(addr)} · ${fmtTime(env.ts)}` }),
      el("span", { class: "body", text: `${shortName(env.from)}: ${env.body}` }));
    li.addEventListener("click", () => openConversation(addr));
    return li;
  });
  if (!items.length) items.push(el("li", { class: "none", text: "Nothing found." }));
  box.replaceChildren(...items);
  box.hidden = false;
}

function scheduleAck() {
  if (state.ackTimer) return;
  state.ackTimer = setTimeout(() => {
    state.ackTimer = null;
    if (state.lastPos > state.ackedPos) {
      sendFrame({ type: "ack", pos: state.lastPos });
      state.ackedPos = state.lastPos;
    }
  }, 250);
}

function onClosed() {
  state.ws = null;
  state.live = false;
  for (const p of state.pending.values()) {
    const e = new Error("connection lost"); e.code = "disconnected"; p.reject(e);
  }
  state.pending.clear();
  if (state.stopped) return;
  state.retry++;
  const delay = Math.min(15000, 500 * 2 ** Math.min(state.retry, 5));
  setConn(`disconnected; retrying in ${Math.round(delay / 1000)} s`, true);
  state.retryTimer = setTimeout(connect, delay);
}

function stop() {
  state.stopped = true;
  clearTimeout(state.retryTimer);
  if (state.ws) { const ws = state.ws; state.ws = null; ws.close(); }
}

// ---- sending -------------------------------------------------------------------------

async function flushOutbox() {
  for (const item of [...state.outbox]) {
    if (item.inFlight) continue;
    item.inFlight = true;
    try {
      const fields = { to: item.to, body: item.body, nonce: item.nonce };
      if (item.replyTo) fields.reply_to = item.replyTo;
      await request("send", fields);
      state.outbox = state.outbox.filter((x) => x !== item);
      showError("send-error", "");
    } catch (err) {
      item.inFlight = false;
      if (err.code === "disconnected") return; // resent with the same nonce later
      state.outbox = state.outbox.filter((x) => x !== item);
      if (err.code === "rate_limited") {
        state.outbox.unshift(item);
        setTimeout(flushOutbox, 1000 * (err.frame.retry_after || 1));
        return;
      }
      showError("send-error", `Not sent: ${err.message}`);
    }
    renderMessages({ stick: true });
  }
}

function queueSend(to, body, replyTo = null) {
  state.outbox.push({ to, body, replyTo, nonce: randomId(), inFlight: false });
  renderMessages({ stick: true });
  if (state.live) flushOutbox();
}

// ---- history -------------------------------------------------------------------------

async function loadHistory(conv, older) {
  const fields = { with: conv.addr, limit: HISTORY_PAGE };
  if (older) {
    const first = Math.min(...conv.items.keys());
    if (Number.isFinite(first)) fields.before = first;
  }
  try {
    const res = await request("history", fields);
    for (const env of res.messages) addItem(conv, env);
    if (res.messages.length < HISTORY_PAGE) conv.hasOlder = false;
    conv.historyLoaded = true;
    if (conv.addr === state.active) scheduleRead();
    if (conv.addr === state.active) renderMessages({ stick: !older, keepTop: older });
  } catch (err) {
    if (err.code === "disconnected") return;
    if (err.code === "not_member" || err.code === "no_such_group") conv.hasOlder = false;
    if (conv.addr === state.active) showError("send-error", err.message);
  }
}

// ---- rendering -----------------------------------------------------------------------

function renderConversations() {
  const list = $("conversations");
  const convs = [...state.conversations.values()].sort((a, b) => b.lastTs - a.lastTs || a.addr.localeCompare(b.addr));
  const items = convs.map((c) => {
    const status = c.group ? "group" : (state.presence.get(c.addr) || "offline");
    const li = el("li", { class: c.addr === state.active ? "active" : "", title: c.addr,
      dataset: { addr: c.addr } },
      el("span", { class: `dot ${status}`, title: c.group ? "group" : status }),
      el("span", { class: "name", text: shortName(c.addr) }),
      c.mentions ? el("span", { class: "badge mention", text: `@${c.mentions}`, "aria-label": "mentions" }) : null,
      c.unread ? el("span", { class: "badge", text: String(c.unread), "aria-label": "unread" }) : null);
    li.addEventListener("click", () => openConversation(c.addr));
    return li;
  });
  list.replaceChildren(...items);
}

function renderHeader() {
  const addr = state.active;
  $("conv-title").textContent = addr ? shortName(addr) : "No conversation";
  $("conv-title").title = addr || "";
  let info = "";
  if (addr && !addr.startsWith("#")) info = state.presence.get(addr) || "offline";
  else if (addr) {
    const g = getConversation(addr).info;
    info = g ? `${g.members} member${g.members === 1 ? "" : "s"}${g.topic ? ` · ${g.topic}` : ""}` : "group";
  }
  $("conv-info").textContent = info;
  const conv = addr ? getConversation(addr) : null;
  $("conv-typing").textContent = conv ? conv.typing : "";
  const top = conv ? newestPos(conv) : 0;
  $("conv-seen").textContent = conv && !conv.group && top && conv.peerRead >= top ? "seen" : "";
}

async function loadGroupInfo(conv) {
  try {
    conv.info = await request("group_info", { group: conv.addr });
    if (conv.addr === state.active) renderHeader();
  } catch { /* not a member (any more), or offline: keep the plain header */ }
}

function describeEvent(env) {
  const m = env.meta || {};
  const who = shortName(env.from);
  const user = m.user ? shortName(m.user) : "";
  switch (m.event) {
    case "created": return `${who} created the group`;
    case "joined": return `${who} joined`;
    case "left": return `${who} left`;
    case "invited": return `${who} invited ${user}`;
    case "kicked": return `${who} removed ${user}${m.reason ? ` (${m.reason})` : ""}`;
    case "banned": return `${who} banned ${user}${m.reason ? ` (${m.reason})` : ""}`;
    case "unbanned": return `${who} unbanned ${user}`;
    case "topic": return `${who} set the topic: ${m.topic || "(none)"}`;
    case "role": return `${who} made ${user} ${m.role}`;
    case "deleted": return `${who} deleted the group`;
    default: return `${who}: ${m.event || env.kind}`;
  }
}

function renderFile(env) {
  const f = env.meta || {};
  const name = f.name || "file";
  const box = el("div", { class: "file" });
  const href = fileUrl(env);
  if (href) {
    const a = el("a", { href, text: name, download: name, rel: "noopener" });
    box.append(a);
  } else {
    box.append(el("span", { text: name }));
  }
  if (typeof f.size === "number") box.append(el("span", { class: "size", text: ` (${fmtSize(f.size)})` }));
  if (env.body && env.body !== name) box.append(el("div", { class: "body", text: env.body }));
  return box;
}

function messageNode(env) {
  if (env.kind === "event") {
    return el("li", { class: "event", dataset: { pos: String(env.pos) }, text: describeEvent(env) });
  }
  if (env.kind === "bounce") { // another realm refused something we sent
    return el("li", { class: "event bounce", dataset: { pos: String(env.pos) }, text: `⚠ ${env.body}` });
  }
  const mine = env.from === state.me;
  const li = el("li", { class: `msg${mine ? " mine" : ""}${mentionsMe(env) ? " mention" : ""}`, dataset: { pos: String(env.pos) } },
    el("div", { class: "meta" },
      el("span", { class: "from", text: shortName(env.from) }),
      el("time", { text: fmtTime(env.ts) })));
  const m = env.meta || {};
  if (m.deleted) {
    li.classList.add("deleted");
    li.append(el("div", { class: "gone", text: "message deleted" }));
    return li;
  }
  if (m.reply_to) li.append(quoteNode(m.reply_to));
  if (env.kind === "file") li.append(renderFile(env));
  else if (env.kind === "text") li.append(el("div", { class: "body", text: env.body }));
  else li.append(el("div", { class: "body", text: `[${env.kind}] ${env.body || ""}` }));
  if (m.edited) li.querySelector(".meta").append(el("span", { class: "edited", text: "(edited)" }));
  if (m.reactions && Object.keys(m.reactions).length) {
    const box = el("div", { class: "reactions" });
    for (const [emoji, users] of Object.entries(m.reactions)) {
      const mine = users.includes(state.me);
      const who = users.map(shortName).join(", ");
      const b = el("button", { type: "button", class: `reaction${mine ? " mine" : ""}`,
        title: mine ? `${who} (click to take yours back)` : `${who} (click to react too)`,
        text: `${emoji} ${users.length}` });
      b.dataset.emoji = emoji;
      b.addEventListener("click", () => react(env, emoji, mine));
      box.append(b);
    }
    li.append(box);
  }
  li.append(actionsNode(env));
  return li;
}

function quoteNode(msgId) {
  const conv = getConversation(state.active);
  const pos = conv.byId.get(msgId);
  const q = pos === undefined ? null : conv.items.get(pos);
  let text = "a message not loaded";
  if (q && q.meta && q.meta.deleted) text = `${shortName(q.from)}: message deleted`;
  else if (q) text = `${shortName(q.from)}: ${q.kind === "file" ? (q.meta || {}).name || "file" : q.body}`;
  return el("blockquote", { class: "quote", text });
}

const QUICK_REACTIONS = ["👍", "❤️", "😂"];
// The reaction picker's choice (part of this page: nothing is fetched from elsewhere).
const PICKER_EMOJI = [
  "👍", "👎", "👏", "🙌", "🙏", "👋", "🤝", "💪", "✌️", "👌", "🤞", "👀",
  "😀", "😄", "😂", "🤣", "😊", "😍", "🥰", "😘", "😉", "😎", "🤔", "😮",
  "😢", "😭", "😡", "🤯", "😱", "🥳", "😴", "🙄", "😬", "🤗", "😅", "🙃",
  "❤️", "🧡", "💛", "💚", "💙", "💜", "🔥", "⭐", "✨", "🎉", "🎂", "🎁",
  "✅", "❌", "⚠️", "❓", "💯", "🚀", "💡", "☕", "🍕", "🍻", "🐛", "👻",
];

// Whether the user reacts to `env` with `emoji` now (the item as shown, which
// reactions arriving meanwhile have changed).
function reacted(env, emoji) {
  const conv = getConversation(state.active);
  const pos = conv.byId.get(env.msg_id);
  const cur = (pos === undefined ? null : conv.items.get(pos)) || env;
  return (((cur.meta || {}).reactions || {})[emoji] || []).includes(state.me);
}

// The picker: a grid of emoji under the message's button; one click reacts, or takes
// one's reaction back (those are marked); Escape or a click elsewhere closes it.
function openPicker(env, anchor) {
  closePicker();
  const box = el("div", { id: "emoji-picker", class: "emoji-picker", role: "dialog",
    "aria-label": "React with" });
  for (const emoji of PICKER_EMOJI) {
    const mine = reacted(env, emoji);
    const b = el("button", { type: "button", class: `pick-emoji${mine ? " mine" : ""}`, text: emoji,
      title: mine ? `${emoji}: take your reaction back` : `react with ${emoji}` });
    b.dataset.emoji = emoji;
    b.setAttribute("aria-pressed", String(mine));
    b.addEventListener("click", () => {
      closePicker();
      react(env, emoji, reacted(env, emoji));
    });
    box.append(b);
  }
  document.body.append(box);
  const r = anchor.getBoundingClientRect();
  const w = box.offsetWidth, h = box.offsetHeight;
  box.style.left = `${Math.max(4, Math.min(r.left, window.innerWidth - w - 4))}px`;
  box.style.top = `${r.bottom + h + 4 <= window.innerHeight ? r.bottom + 4 : Math.max(4, r.top - h - 4)}px`;
  box.querySelector("button").focus();
}

function closePicker() {
  const p = $("emoji-picker");
  if (p) p.remove();
}

function actionsNode(env) {
  const box = el("div", { class: "actions" });
  const button = (label, cls, fn) => {
    const b = el("button", { type: "button", class: `secondary ${cls}`, text: label });
    b.addEventListener("click", fn);
    box.append(b);
    return b;
  };
  button("Reply", "reply", () => setCompose("reply", env));
  for (const emoji of QUICK_REACTIONS) {
    button(emoji, "react", () => react(env, emoji, reacted(env, emoji))).dataset.emoji = emoji;
  }
  const more = button("☺+", "pick", () => openPicker(env, more));
  more.title = "more reactions";
  more.setAttribute("aria-haspopup", "dialog");
  if (env.from === state.me) {
    if (env.kind === "text") button("Edit", "edit", () => setCompose("edit", env));
    const del = button("Delete", "delete", () => {
      if (!del.classList.contains("confirm")) {
        del.classList.add("confirm");
        del.textContent = "Really delete?";
        return;
      }
      act("delete", { msg_id: env.msg_id });
    });
  } else if (env.kind === "text" || env.kind === "file") {
    button("Report", "report", () => reportMessage(env));
  }
  return box;
}

async function act(type, fields) {
  try {
    await request(type, fields);
    showError("send-error", "");
  } catch (err) {
    showError("send-error", err.message);
  }
}

function react(env, emoji, had) {
  const fields = { msg_id: env.msg_id, emoji };
  if (had) fields.remove = true;
  act("react", fields);
}

// Reply and edit: a line above the composer says what Enter will do; Escape or its
// button cancels.
function setCompose(mode, env) {
  state.compose = env ? { mode, env } : null;
  const bar = $("compose-bar");
  if (!state.compose) {
    bar.hidden = true;
    return;
  }
  const what = mode === "edit" ? "Editing your message" : `Replying to ${shortName(env.from)}`;
  $("compose-what").textContent = `${what}: ${env.kind === "file" ? (env.meta || {}).name : env.body}`;
  bar.hidden = false;
  if (mode === "edit") $("text").value = env.body;
  $("text").focus();
}

// A report goes to the realm's administrators (PROTOCOL.md, "report"); the reason is
// asked for with the browser's own prompt.
async function reportMessage(env) {
  const reason = window.prompt(`Report this message from ${shortName(env.from)} to the administrators. Why?`);
  if (reason === null) return;
  try {
    const res = await request("report", { msg_id: env.msg_id, reason });
    showError("send-error", `Reported (report ${res.report}).`);
  } catch (err) {
    showError("send-error", `Report failed: ${err.message}`);
  }
}

function renderMessages({ stick = false, keepTop = false } = {}) {
  const addr = state.active;
  const scroller = $("scroller");
  const atBottom = scroller.scrollHeight - scroller.scrollTop - scroller.clientHeight < 40;
  const oldHeight = scroller.scrollHeight;
  const list = $("messages");
  if (!addr) { list.replaceChildren(); $("older").hidden = true; return; }
  const conv = getConversation(addr);
  const items = [...conv.items.values()].sort((a, b) => a.pos - b.pos).map(messageNode);
  for (const o of state.outbox.filter((x) => x.to === addr)) {
    items.push(el("li", { class: "msg mine pending" },
      el("div", { class: "meta" }, el("span", { text: "sending…" })),
      el("div", { class: "body", text: o.body })));
  }
  list.replaceChildren(...items);
  $("older").hidden = !conv.hasOlder || !conv.historyLoaded;
  if (keepTop) scroller.scrollTop = scroller.scrollHeight - oldHeight;
  else if (stick && atBottom) scroller.scrollTop = scroller.scrollHeight;
  else if (!stick) scroller.scrollTop = scroller.scrollHeight;
}

function openConversation(addr) {
  state.active = addr;
  const conv = getConversation(addr);
  conv.unread = 0;
  conv.mentions = 0;
  $("composer").hidden = false;
  showError("send-error", "");
  showError("open-error", "");
  renderConversations();
  renderHeader();
  renderMessages();
  if (!conv.historyLoaded && state.live) loadHistory(conv, false);
  else scheduleRead();
  if (conv.group && state.live) loadGroupInfo(conv);
  if (!conv.group && state.live) lookUpUser(addr).catch(() => {});
  $("text").focus();
}

// The realm sends presence frames for contacts only: someone new (no shared group, no
// message yet) is asked about directly, so a new conversation does not show them
// offline while they are online.  Fails with the realm's error (no_such_user...).
async function lookUpUser(addr) {
  const res = await request("who", { user: addr });
  const entry = (res.users || [])[0];
  state.presence.set(addr, entry ? entry.status || "online" : "offline");
  renderConversations();
  renderHeader();
  return entry;
}

// ---- files ---------------------------------------------------------------------------

function fileUrl(env) {
  const f = env.meta || {};
  if (!f.file_id) return null;
  return `/files/${encodeURIComponent(f.file_id)}`;
}

async function uploadFile(file) {
  const to = state.active;
  if (!to) return;
  const bar = el("progress", { max: 100, value: 0 });
  const pct = el("span", { class: "pct", text: "hashing…" });
  const row = el("div", { class: "upload" }, el("span", { text: file.name }), bar, pct);
  $("uploads").append(row);
  const failed = (why) => {
    pct.textContent = `failed: ${why}`;
    row.classList.add("error");
    setTimeout(() => row.remove(), 8000);
  };
  let sha256;
  try {
    // the realm checks the bytes against this digest before storing anything
    sha256 = await hashBlob(file, (done) => { pct.textContent = `hashing ${Math.round((100 * done) / (file.size || 1))}%`; });
  } catch (err) { failed(err.message); return; }
  const type = /^[\w!#$&^.+-]+\/[\w!#$&^.+-]+$/.test(file.type) ? file.type : "application/octet-stream";
  const xhr = new XMLHttpRequest();
  const params = new URLSearchParams({ to, name: file.name, sha256 });
  xhr.open("POST", `/files?${params}`);
  xhr.setRequestHeader("Content-Type", type);
  xhr.upload.onprogress = (ev) => {
    if (ev.lengthComputable) {
      const p = Math.round((100 * ev.loaded) / (ev.total || 1));
      bar.value = p; pct.textContent = `${p}%`;
    }
  };
  xhr.onload = () => {
    let data = {};
    try { data = JSON.parse(xhr.responseText); } catch { /* not JSON */ }
    if (xhr.status >= 200 && xhr.status < 300) { row.remove(); return; }
    failed(data.message || xhr.statusText);
  };
  xhr.onerror = () => failed("network error");
  pct.textContent = "0%";
  xhr.send(file);
}

// ---- login view ----------------------------------------------------------------------

function showLogin(message) {
  $("chat-view").hidden = true;
  $("login-view").hidden = false;
  showError("login-error", message || "");
  $("login-user").focus();
}

function showChat() {
  $("login-view").hidden = true;
  $("chat-view").hidden = false;
}

function resetSession(user) {
  state.me = user;
  state.lastPos = 0;
  state.ackedPos = 0;
  state.conversations = new Map();
  state.outbox = [];
  state.active = null;
  state.presence = new Map();
  state.retry = 0;
  $("me").textContent = user;
  loadConversations();
  renderConversations();
  renderHeader();
  renderMessages();
  $("composer").hidden = true;
}

async function loggedIn(user) {
  resetSession(user);
  const at = user.lastIndexOf("@");
  state.realm = at >= 0 ? user.slice(at + 1) : null;
  $("me").textContent = shortName(user);
  showChat();
  connect();
}

async function doLogin(register) {
  const user = $("login-user").value.trim();
  const password = $("login-password").value;
  showError("login-error", "");
  $("login-button").disabled = $("register-button").disabled = true;
  try {
    if (register) await api("/api/register", { user, password });
    const res = await api("/api/login", { user, password, device: deviceName() });
    $("login-password").value = "";
    await loggedIn(res.user);
  } catch (err) {
    showError("login-error", err.message);
  } finally {
    $("login-button").disabled = $("register-button").disabled = false;
  }
}

// ---- wiring --------------------------------------------------------------------------

async function openByName(text) {
  text = text.trim();
  if (!text) return;
  showError("open-error", "");
  if (!text.startsWith("#")) {
    const addr = (text.includes("@") ? text : `${text}@${state.realm}`).toLowerCase();
    // a name that is no account is refused here, not after the first message
    try { await lookUpUser(addr); }
    catch (err) {
      if (["no_such_user", "bad_address", "remote_realm", "peer_denied"].includes(err.code)) {
        showError("open-error", err.message);
        return;
      }
    }
    openConversation(addr);
    return;
  }
  let group = text.includes("@") ? text : `${text}@${state.realm}`;
  try {
    const res = await request("join", { group });
    group = res.group;
  } catch (err) {
    if (err.code === "no_such_group") {
      try { group = (await request("create_group", { group })).group; }
      catch (e2) { showError("open-error", e2.message); return; }
    } else if (err.code !== "already_member") { showError("open-error", err.message); return; }
  }
  openConversation(group.toLowerCase());
}

function init() {
  $("login-form").addEventListener("submit", (ev) => { ev.preventDefault(); doLogin(false); });
  $("register-button").addEventListener("click", () => {
    if ($("login-form").reportValidity()) doLogin(true);
  });
  $("logout").addEventListener("click", async () => {
    stop();
    try { await api("/api/logout", {}); } catch { /* the cookie is gone either way */ }
    resetSession(null);
    showLogin("Logged out.");
  });
  $("logout-all").addEventListener("click", async () => {
    stop();
    let note = "Logged out everywhere.";
    try {
      const res = await api("/api/logout", { everywhere: true });
      note = `Logged out everywhere (${res.logins_ended} browser login${res.logins_ended === 1 ? "" : "s"} ended).`;
    } catch (err) { note = `Logged out here; ending the others failed: ${err.message}`; }
    resetSession(null);
    showLogin(note);
  });
  $("open-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    openByName($("open-input").value);
    $("open-input").value = "";
  });
  $("composer").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const text = $("text").value;
    if (!text.trim() || !state.active) return;
    const max = state.limits.max_body;
    if (max && new TextEncoder().encode(text).length > max) {
      showError("send-error", `Too long: at most ${max} bytes.`);
      return;
    }
    $("text").value = "";
    const compose = state.compose;
    setCompose(null);
    if (compose && compose.mode === "edit") act("edit", { msg_id: compose.env.msg_id, body: text });
    else queueSend(state.active, text, compose ? compose.env.msg_id : null);
  });
  $("compose-cancel").addEventListener("click", () => { setCompose(null); $("text").value = ""; });
  $("text").addEventListener("input", userTyping);
  $("search-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    runSearch($("search-input").value);
  });
  $("text").addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); $("composer").requestSubmit(); }
    if (ev.key === "Escape" && state.compose) { setCompose(null); $("text").value = ""; }
  });
  $("file-input").addEventListener("change", () => {
    for (const f of $("file-input").files) uploadFile(f);
    $("file-input").value = "";
  });
  $("older").addEventListener("click", () => {
    if (state.active) loadHistory(getConversation(state.active), true);
  });
  $("status").addEventListener("change", () => {
    request("set_status", { status: $("status").value }).catch((e) => setConn(e.message, true));
  });
  document.addEventListener("keydown", (ev) => { if (ev.key === "Escape") closePicker(); });
  document.addEventListener("mousedown", (ev) => {
    const p = $("emoji-picker");
    if (p && !p.contains(ev.target) && !ev.target.closest(".actions button.pick")) closePicker();
  });
  document.addEventListener("visibilitychange", () => {
    if (document.visibilityState === "visible" && state.active) {
      getConversation(state.active).unread = 0;
      getConversation(state.active).mentions = 0;
      renderConversations();
      scheduleRead();
    }
  });
  api("/api/session").then((s) => loggedIn(s.user), () => showLogin(""));
}

init();
