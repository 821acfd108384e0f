// The fuselm chat page: plain JavaScript, no libraries, works offline. It talks to the same OpenAI-style API
// as any client: POST /v1/chat/completions with "stream": true, reading server-sent events as they come.
"use strict";

const $ = (id) => document.getElementById(id);
const log = $("log");
let history = [];        // OpenAI chat messages so far
let attachments = [];    // data URLs for the next message
let modelId = null;
let controller = null;   // aborts the running request

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function bubble(role) {
  const div = document.createElement("div");
  div.className = "message " + role;
  log.appendChild(div);
  log.scrollTop = log.scrollHeight;
  return div;
}

async function loadModel() {
  try {
    const r = await fetch("/v1/models", { headers: headers() });
    const body = await r.json();
    if (!r.ok) throw new Error(body.error ? body.error.message : r.statusText);
    const m = body.data[0];
    modelId = m.id;
    const meta = m.meta || {};
    const parts = [m.id, meta.arch, meta.file_type, meta.context && ("context " + meta.context)];
    if (meta.draws_pictures) parts.push("reads and draws pictures");
    $("model-info").textContent = parts.filter(Boolean).join(" · ");
    $("modalities").disabled = !meta.draws_pictures;
    $("picture").disabled = !meta.reads_pictures;
  } catch (err) {
    $("model-info").textContent = "model info unavailable: " + err.message;
  }
}

function showAttachments() {
  const box = $("attachments");
  box.innerHTML = "";
  for (const url of attachments) {
    const img = document.createElement("img");
    img.src = url;
    box.appendChild(img);
  }
}

$("picture").addEventListener("change", () => {
  const file = $("picture").files[0];
  if (!file) return;
  const reader = new FileReader();
  reader.onload = () => { attachments.push(reader.result); showAttachments(); $("picture").value = ""; };
  reader.readAsDataURL(file);
});

// Yields each parsed "data:" payload of a server-sent event stream.
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of block.split("\n")) {
        if (line.startsWith("data: ")) yield line.slice(6);
      }
    }
  }
}

async function send(text) {
  const content = attachments.length
    ? [...attachments.map((url) => ({ type: "image_url", image_url: { url } })), { type: "text", text }]
    : text;
  const userDiv = bubble("user");
  for (const url of attachments) { const img = document.createElement("img"); img.src = url; userDiv.appendChild(img); }
  userDiv.appendChild(document.createTextNode(text));
  history.push({ role: "user", content });
  attachments = [];
  showAttachments();

  const out = bubble("assistant");
  let textNode = null;
  const pictures = {};       // image index -> <img>
  const answerParts = [];    // what goes back into the history
  const request = {
    model: modelId, messages: history, stream: true, stream_options: { include_usage: true },
    temperature: Number($("temperature").value), max_tokens: Number($("max-tokens").value),
  };
  if (!$("modalities").disabled) request.modalities = $("modalities").value.split(",");
  controller = new AbortController();
  $("stop").disabled = false;
  $("send").disabled = true;
  try {
    const r = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(request), signal: controller.signal });
    if (!r.ok) {
      const body = await r.json();
      throw new Error(body.error ? body.error.message : r.statusText);
    }
    for await (const data of events(r)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) {
        const meta = document.createElement("div");
        meta.className = "meta";
        meta.textContent = chunk.usage.completion_tokens + " tokens";
        out.appendChild(meta);
        continue;
      }
      const delta = chunk.choices[0].delta;
      if (delta.content) {
        if (!textNode) { textNode = document.createTextNode(""); out.appendChild(textNode); }
        textNode.data += delta.content;
        const last = answerParts[answerParts.length - 1];
        if (last && last.type === "text") last.text += delta.content;
        else answerParts.push({ type: "text", text: delta.content });
      }
      if (delta.image) {
        const im = delta.image;
        if (!pictures[im.index]) {
          const img = document.createElement("img");
          img.className = "picture";
          img.alt = "picture " + (im.index + 1);
          img.dataset.status = "drawing";
          out.appendChild(img);
          pictures[im.index] = img;
          textNode = null;   // text after a picture goes below it
        }
        if (im.url) pictures[im.index].src = im.url;
        if (im.status === "done") {
          pictures[im.index].dataset.status = "done";
          answerParts.push({ type: "image_url", image_url: { url: im.url } });
        }
      }
      log.scrollTop = log.scrollHeight;
    }
  } catch (err) {
    if (err.name !== "AbortError") {
      const e = bubble("error");
      e.textContent = err.message;
    }
  } finally {
    controller = null;
    $("stop").disabled = true;
    $("send").disabled = false;
  }
  const onlyText = answerParts.every((p) => p.type === "text");
  history.push({ role: "assistant",
                 content: onlyText ? answerParts.map((p) => p.text).join("") : answerParts });
}

$("composer").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("prompt").value.trim();
  if (!text || controller) return;
  $("prompt").value = "";
  send(text);
});
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("composer").requestSubmit(); }
});
$("stop").addEventListener("click", () => { if (controller) controller.abort(); });
$("reset").addEventListener("click", () => { history = []; log.innerHTML = ""; });
$("api-key").value = localStorage.getItem("fuselm-api-key") || "";
$("api-key").addEventListener("change", () => { localStorage.setItem("fuselm-api-key", $("api-key").value); loadModel(); });
loadModel();
