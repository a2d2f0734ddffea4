// The gazecam web client: live crop and step from /v1/live, asks over /v1/ask (see
// docs/protocol.md). Plain JS, no build step. A token, where the server needs one, comes
// from the page's #token=... fragment (never sent to the server in the URL) or the form,
// and is kept for this tab only.
"use strict";

const $ = (id) => document.getElementById(id);
const TOKEN_KEY = "gazecam-token";
const RETRY_MAX_MS = 10000;

const fragment = new URLSearchParams(location.hash.slice(1));
if (fragment.has("token")) {
  sessionStorage.setItem(TOKEN_KEY, fragment.get("token"));
  history.replaceState(null, "", location.pathname);
}
let token = sessionStorage.getItem(TOKEN_KEY) || "";

function authHeaders() {
  return token ? { Authorization: `Bearer ${token}` } : {};
}

function socketUrl(path) {
  const url = new URL(path, location.href);
  url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  if (token) url.searchParams.set("token", token); // browsers cannot set websocket headers
  return url;
}

function needToken() {
  $("token-form").hidden = false;
  $("connection").textContent = "token needed";
  $("connection").classList.remove("ok");
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

// A socket that reconnects with a growing wait, except when the server refused the token.
function keepOpen(path, onMessage, onOpen) {
  let wait = 500;
  const connect = () => {
    const socket = new WebSocket(socketUrl(path));
    socket.onopen = () => {
      wait = 500;
      onOpen(socket);
    };
    socket.onmessage = (event) => onMessage(JSON.parse(event.data));
    socket.onclose = (event) => {
      onOpen(null);
      if (event.code === 1008) return needToken();
      setTimeout(connect, wait);
      wait = Math.min(2 * wait, RETRY_MAX_MS);
    };
  };
  connect();
}

// --- live state: step, crop and gaze marker ---------------------------------------------
let shownCrop = null;
let fetchingCrop = false;

async function loadCrop(crop) {
  if (fetchingCrop) return; // the next state brings it up to date
  fetchingCrop = true;
  try {
    const response = await fetch("/v1/crop.jpg", { headers: authHeaders(), cache: "no-store" });
    if (response.status === 401) return needToken();
    if (!response.ok) return;
    const url = URL.createObjectURL(await response.blob());
    const img = $("crop");
    if (img.src) URL.revokeObjectURL(img.src);
    img.src = url;
    shownCrop = crop.timestamp_ns;
    const [x0, y0, x1, y1] = crop.box;
    const [gx, gy] = crop.gaze;
    const marker = $("gaze");
    marker.style.left = `${(100 * (gx - x0)) / (x1 - x0)}%`;
    marker.style.top = `${(100 * (gy - y0)) / (y1 - y0)}%`;
    marker.hidden = false;
    $("crop-empty").hidden = true;
  } finally {
    fetchingCrop = false;
  }
}

function showState(state) {
  const step = state.step;
  $("step").textContent = `Step ${step.index} of ${step.total}: ${step.title}`;
  $("step-confidence").textContent = `${Math.round(100 * step.confidence)}% sure · source ${state.source}`;
  if (state.crop && state.crop.timestamp_ns !== shownCrop) loadCrop(state.crop);
  if (state.crop) {
    const age = (state.frame_timestamp_ns - state.crop.timestamp_ns) / 1e9;
    $("crop-time").textContent = `crop ${age.toFixed(1)} s ago`;
  }
}

keepOpen("/v1/live", showState, (socket) => {
  $("connection").textContent = socket ? "live" : "reconnecting…";
  $("connection").classList.toggle("ok", Boolean(socket));
});

async function sendEvent(name) {
  const response = await fetch("/v1/events", {
    method: "POST",
    headers: { ...authHeaders(), "Content-Type": "application/json" },
    body: JSON.stringify({ name }),
  });
  if (response.status === 401) return needToken();
  if (!response.ok) showError((await response.json()).message);
}
$("step-back").onclick = () => sendEvent("step.back");
$("step-next").onclick = () => sendEvent("step.next");

// --- asks -----------------------------------------------------------------------------
let askSocket = null;
let pending = null; // {id, sent, first}
let asks = 0;

function finishAsk() {
  pending = null;
  $("ask").disabled = !askSocket;
}

function onReply(frame) {
  if (!pending || frame.id !== pending.id) {
    if (frame.type === "error") showError(frame.message);
    return;
  }
  const now = performance.now();
  if (frame.type === "token") {
    if (pending.first === null) pending.first = now - pending.sent;
    $("answer").textContent += frame.text;
  } else if (frame.type === "answer") {
    $("answer").textContent = frame.text;
    const first = pending.first ?? now - pending.sent;
    $("latency").textContent =
      `first words ${first.toFixed(0)} ms · answer ${(now - pending.sent).toFixed(0)} ms ` +
      `(model: first token ${frame.timings.ttft_ms.toFixed(0)} ms)`;
    finishAsk();
  } else if (frame.type === "error") {
    showError(frame.message);
    finishAsk();
  }
}

keepOpen("/v1/ask", onReply, (socket) => {
  askSocket = socket;
  if (!socket && pending) {
    showError("connection lost; ask again");
    pending = null;
  }
  $("ask").disabled = !socket || pending !== null;
});

function ask(question) {
  question = question.trim();
  if (!question || !askSocket || pending) return;
  asks += 1;
  pending = { id: `ask-${Date.now()}-${asks}`, sent: performance.now(), first: null };
  $("answer").textContent = "";
  $("latency").textContent = "";
  showError("");
  $("ask").disabled = true;
  askSocket.send(JSON.stringify({ type: "ask", id: pending.id, question }));
}

$("ask-form").onsubmit = (event) => {
  event.preventDefault();
  ask($("question").value);
};

$("token-form").onsubmit = (event) => {
  event.preventDefault();
  token = $("token").value.trim();
  sessionStorage.setItem(TOKEN_KEY, token);
  location.reload();
};

// Voice: where the browser has speech recognition (Chrome, Safari; it needs https or
// localhost), the microphone button asks what was said.
const Recognition = window.SpeechRecognition || window.webkitSpeechRecognition;
if (Recognition) {
  const mic = $("mic");
  mic.hidden = false;
  mic.onclick = () => {
    const recognition = new Recognition();
    recognition.lang = navigator.language || "en-US";
    recognition.interimResults = false;
    recognition.onresult = (event) => {
      const said = event.results[0][0].transcript;
      $("question").value = said;
      ask(said);
    };
    recognition.onerror = (event) => showError(`voice: ${event.error}`);
    recognition.onend = () => mic.classList.remove("listening");
    mic.classList.add("listening");
    recognition.start();
  };
}
