// The labelling page: keys <- -> (preference), down (tie), space (skip), u (undo).
// The server records each judgment (written and fsynced) before it answers with the next pair, and only
// then is that pair shown; while a request is in flight, keys are ignored. Captions and names are set as
// text (textContent), never as markup.
"use strict";

const KEYS = {ArrowLeft: "left", ArrowRight: "right", ArrowDown: "tie", " ": "skip", u: "undo", U: "undo"};
let user = null;
let current = null;  // the pair shown: {id, caption, left, right}
let busy = false;

const $ = (id) => document.getElementById(id);

function status(text) { $("status").textContent = text; }

function show(view) {
  user = view.user;
  const p = view.progress;
  const progress = $("progress");
  progress.textContent = `${user}: ${p.judged} of ${p.total} judged` + (p.skipped ? `, ${p.skipped} skipped` : "");
  progress.dataset.judged = p.judged;
  progress.dataset.skipped = p.skipped;
  progress.dataset.total = p.total;
  current = view.pair;
  $("done").hidden = current !== null;
  $("main").hidden = current === null;
  document.body.dataset.state = current === null ? "done" : "judging";
  if (current !== null) {
    $("caption").textContent = current.caption;
    $("left").src = current.left;
    $("right").src = current.right;
    $("pair").dataset.pairId = current.id;
  } else {
    $("pair").dataset.pairId = "";
  }
}

async function call(method, path, body) {
  const response = await fetch(path, {
    method, headers: body ? {"Content-Type": "application/json"} : {}, body: body ? JSON.stringify(body) : undefined,
  });
  const data = await response.json();
  if (response.ok || response.status === 409) return [response.status, data];
  throw new Error(typeof data.detail === "string" ? data.detail : JSON.stringify(data.detail));
}

async function act(choice) {
  if (busy || user === null) return;
  if (choice !== "undo" && current === null) return;
  busy = true;
  document.body.dataset.busy = "1";
  try {
    const [code, view] = choice === "undo"
      ? await call("POST", "/api/undo", {user})
      : await call("POST", "/api/judge", {user, pair: current.id, choice});
    show(view);
    status(code === 409 ? view.detail : choice === "undo" ? "undone: that pair again" : `saved: ${choice}`);
  } catch (e) {
    status(`not saved: ${e.message}`);
  } finally {
    busy = false;
    delete document.body.dataset.busy;
  }
}

async function start(name) {
  name = name.trim();
  if (!name) { status("type your name first"); return; }
  busy = true;
  try {
    const [, view] = await call("GET", `/api/next?user=${encodeURIComponent(name)}`);
    localStorage.setItem("prefpipe-annotator", view.user);
    show(view);
    status(`hello ${view.user}`);
    document.activeElement.blur();
  } catch (e) {
    status(`cannot start: ${e.message}`);
  } finally {
    busy = false;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("who").addEventListener("submit", (event) => { event.preventDefault(); start($("name").value); });
  for (const button of document.querySelectorAll("#keys button")) {
    button.addEventListener("click", () => act(button.dataset.choice));
  }
  document.addEventListener("keydown", (event) => {
    if (event.target === $("name") || event.ctrlKey || event.metaKey || event.altKey) return;
    const choice = KEYS[event.key];
    if (choice === undefined) return;
    event.preventDefault();  // no scrolling on arrows and space
    if (!event.repeat) act(choice);
  });
  const saved = localStorage.getItem("prefpipe-annotator");
  if (saved) { $("name").value = saved; start(saved); } else { $("name").focus(); }
});
