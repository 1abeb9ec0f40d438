// The chat page: model picker, streamed answers, stop, conversations kept in localStorage, artifacts side by side.
// Model text only ever reaches the page through textContent / text nodes (markdown.js, highlight.js).
import {
  ApiError, apiMessages, applyDelta, listModels, loadChats, loadSettings, newChat, saveChats, saveSettings,
  streamChat,
} from "./chat.js";
import { codeBlock, render } from "./markdown.js";

const $ = (id) => document.getElementById(id);
const ui = {
  model: $("model"), artifact: $("artifact"), artifactMode: $("artifact-mode"), apiKey: $("api-key"),
  maxTokens: $("max-tokens"), temperature: $("temperature"), thinking: $("thinking-template"), newChat: $("new-chat"), chats: $("chats"),
  messages: $("messages"), error: $("error"), composer: $("composer"), prompt: $("prompt"), send: $("send"),
  stop: $("stop"), usage: $("usage"), artifacts: $("artifacts"),
};
const settings = loadSettings();
const state = loadChats();
let controller = null;
let pending = 0;

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function button(label, onClick, className) {
  const node = el("button", className, label);
  node.type = "button";
  node.addEventListener("click", onClick);
  return node;
}

function copyButton(text) {
  const node = button("Copy", async () => {
    try {
      await navigator.clipboard.writeText(typeof text === "function" ? text() : text);
      node.textContent = "Copied";
    } catch {
      node.textContent = "Copy failed";
    }
    setTimeout(() => { node.textContent = "Copy"; }, 1500);
  }, "copy");
  return node;
}

function showError(message, source = "") {
  ui.error.textContent = message || "";
  ui.error.hidden = !message;
  ui.error.dataset.source = message ? source : "";
}

function current() {
  let chat = state.chats.find((c) => c.id === state.current);
  if (!chat) {
    chat = state.chats[0] || newChat();
    if (!state.chats.includes(chat)) state.chats.unshift(chat);
    state.current = chat.id;
  }
  return chat;
}

function save() {
  try {
    saveChats(state);
  } catch (error) {
    showError(`Could not keep the conversation in this browser: ${error.message}`);
  }
}

// -- settings --------------------------------------------------------------------------------------------------
function readSettings() {
  settings.apiKey = ui.apiKey.value;
  settings.model = ui.model.value || settings.model;
  settings.artifact = ui.artifact.checked;
  settings.artifactMode = ui.artifactMode.value;
  settings.maxTokens = ui.maxTokens.value;
  settings.temperature = ui.temperature.value;
  settings.thinking = ui.thinking.value;
  saveSettings(settings);
}

async function refreshModels() {
  try {
    const models = await listModels(settings.apiKey);
    ui.model.replaceChildren(...models.map((id) => {
      const option = el("option", null, id);
      option.value = id;
      return option;
    }));
    if (models.includes(settings.model)) ui.model.value = settings.model;
    ui.model.dataset.loaded = "true";
    if (!models.length) showError("No model is ready on this server yet.");
    else if (ui.error.dataset.source === "models") showError("");
  } catch (error) {
    showError(`Could not list the models: ${error.message}`, "models");
  }
}

// -- rendering -------------------------------------------------------------------------------------------------
const ROLES = { user: "You", assistant: "Assistant", system: "System", tool: "Tool result" };

function isArtifact(segment) {
  return segment.meta && segment.meta.tag_type === "artifact";
}

function artifactId(messageIndex, segmentIndex) {
  return `artifact-${messageIndex}-${segmentIndex}`;
}

function renderMessage(message, index) {
  const node = el("article", `message role-${message.role}`);
  node.dataset.index = String(index);
  const head = el("header");
  head.append(el("span", "role", ROLES[message.role] || message.role));
  if (message.name) head.append(el("span", "name", message.name));
  head.append(copyButton(() => apiMessages([message])[0]?.content ?? ""));
  node.append(head);
  if (message.reasoning_content) {
    const details = el("details", "reasoning");
    details.append(el("summary", null, "Thinking"), el("pre", null, message.reasoning_content));
    node.append(details);
  }
  const body = el("div", "content");
  if (message.segments && message.segments.length) {
    message.segments.forEach((segment, segmentIndex) => {
      if (!isArtifact(segment)) {
        body.append(render(segment.content));
        return;
      }
      const title = segment.meta.title || segment.meta.identifier || "artifact";
      const chip = button(`▣ ${title}${segment.meta.language ? ` (${segment.meta.language})` : ""}`, () => {
        document.getElementById(artifactId(index, segmentIndex))?.scrollIntoView({ behavior: "smooth" });
      }, "artifact-chip");
      body.append(chip);
    });
  } else if (message.role === "tool") {
    body.append(codeBlock(String(message.content ?? ""), "json"));
  } else if (typeof message.content === "string") {
    body.append(render(message.content));
  } else if (Array.isArray(message.content)) {
    body.append(render(message.content.map((part) => part.text || `[${part.type}]`).join("\n")));
  }
  if (message.tool_call_id) node.append(el("p", "tool-id", `for call ${message.tool_call_id}`));
  node.append(body);
  for (const call of message.tool_calls || []) {
    const box = el("div", "tool-call");
    box.append(el("div", "tool-name", `Tool call: ${call.function?.name || "?"}${call.id ? ` (${call.id})` : ""}`));
    box.append(codeBlock(call.function?.arguments || "", "json"));
    node.append(box);
  }
  if (message.stopped) node.append(el("p", "note", "Stopped."));
  if (message.error) node.append(el("p", "message-error", message.error));
  return node;
}

const PREVIEWABLE = new Set(["html", "htm", "svg", "xml", "xhtml"]);

function previewable(segment) {
  const language = String(segment.meta.language || "").toLowerCase();
  return PREVIEWABLE.has(language) || /^\s*(<!doctype html|<html|<svg)/i.test(segment.content);
}

function renderArtifact(segment, id) {
  const card = el("section", "artifact");
  card.id = id;
  const head = el("header");
  head.append(el("span", "title", segment.meta.title || segment.meta.identifier || "artifact"));
  if (segment.meta.language) head.append(el("span", "language", segment.meta.language));
  head.append(copyButton(segment.content));
  const code = codeBlock(segment.content, segment.meta.language);
  if (previewable(segment)) {
    let frame = null;
    const toggle = button("Preview", () => {
      if (frame) {
        frame.remove();
        frame = null;
        code.hidden = false;
        toggle.textContent = "Preview";
        return;
      }
      frame = document.createElement("iframe");
      frame.setAttribute("sandbox", ""); // no scripts, no same origin, no forms, no top navigation
      frame.title = `Preview of ${segment.meta.title || "artifact"}`;
      frame.srcdoc = segment.content;
      code.hidden = true;
      code.after(frame);
      toggle.textContent = "Code";
    }, "preview");
    head.append(toggle);
  }
  card.append(head, code);
  return card;
}

function renderArtifacts(chat) {
  const cards = [];
  chat.messages.forEach((message, index) => {
    (message.segments || []).forEach((segment, segmentIndex) => {
      if (isArtifact(segment)) cards.push(renderArtifact(segment, artifactId(index, segmentIndex)));
    });
  });
  ui.artifacts.replaceChildren(el("h2", null, "Artifacts"), ...cards);
  ui.artifacts.hidden = !cards.length;
  document.body.classList.toggle("with-artifacts", cards.length > 0);
}

function renderChats() {
  ui.chats.replaceChildren(...state.chats.map((chat) => {
    const item = button(chat.title || "New chat", () => {
      if (controller) return;
      state.current = chat.id;
      save();
      renderAll();
    }, chat.id === state.current ? "chat current" : "chat");
    return item;
  }));
}

function renderAll() {
  const chat = current();
  ui.messages.replaceChildren(...chat.messages.map(renderMessage));
  renderArtifacts(chat);
  renderChats();
}

function rerender(chat, index) {
  const old = ui.messages.querySelector(`article[data-index="${index}"]`);
  const fresh = renderMessage(chat.messages[index], index);
  const reasoning = fresh.querySelector("details.reasoning");
  if (reasoning && old?.querySelector("details.reasoning")?.open) reasoning.open = true; // as the user left it
  if (old) old.replaceWith(fresh);
  else ui.messages.append(fresh);
  if ((chat.messages[index].segments || []).some(isArtifact)) renderArtifacts(chat);
  fresh.scrollIntoView({ block: "end" });
}

function scheduleRender(chat, index) {
  if (pending) return;
  pending = requestAnimationFrame(() => {
    pending = 0;
    rerender(chat, index);
  });
}

// -- sending ---------------------------------------------------------------------------------------------------
function setBusy(busy) {
  document.body.dataset.busy = busy ? "true" : "false";
  ui.send.hidden = busy;
  ui.stop.hidden = !busy;
  ui.prompt.disabled = busy;
}

function requestBody(chat) {
  const body = {
    model: ui.model.value, messages: apiMessages(chat.messages), stream: true,
    stream_options: { include_usage: true },
  };
  if (ui.artifact.checked) body.artifact = ui.artifactMode.value || "Fast";
  const maxTokens = parseInt(ui.maxTokens.value, 10);
  if (maxTokens > 0) body.max_tokens = maxTokens;
  const temperature = parseFloat(ui.temperature.value);
  if (!Number.isNaN(temperature)) body.temperature = temperature;
  if (ui.thinking.value.trim()) {
    body.thinking_template = ui.thinking.value;
    body.return_thinking = "separate";
  }
  return body;
}

async function send(text) {
  readSettings();
  showError("");
  if (!ui.model.value) {
    showError("Pick a model first (no model is listed: check the API key in Settings).");
    return;
  }
  const chat = current();
  chat.messages.push({ role: "user", content: text });
  if (chat.title === "New chat") chat.title = text.slice(0, 40);
  const answer = { role: "assistant", content: "", segments: [] };
  chat.messages.push(answer);
  const index = chat.messages.length - 1;
  save();
  renderAll();
  controller = new AbortController();
  setBusy(true);
  ui.usage.textContent = "";
  try {
    const body = requestBody({ messages: chat.messages.slice(0, -1) });
    for await (const chunk of streamChat(body, settings.apiKey, controller.signal)) {
      for (const choice of chunk.choices || []) applyDelta(answer, choice.delta || {});
      if (chunk.usage) {
        answer.usage = chunk.usage;
        ui.usage.textContent = `${chunk.usage.prompt_tokens} prompt tokens, ${chunk.usage.completion_tokens} ` +
          "completion tokens";
      }
      scheduleRender(chat, index);
    }
  } catch (error) {
    if (error.name === "AbortError") answer.stopped = true;
    else {
      answer.error = error instanceof ApiError ? error.message : `The request failed: ${error.message}`;
      showError(answer.error);
    }
  } finally {
    controller = null;
    if (pending) cancelAnimationFrame(pending);
    pending = 0;
    save();
    rerender(chat, index);
    setBusy(false);
    ui.prompt.focus();
  }
}

// -- wiring ----------------------------------------------------------------------------------------------------
function start() {
  ui.apiKey.value = settings.apiKey || "";
  ui.artifact.checked = Boolean(settings.artifact);
  ui.artifactMode.value = settings.artifactMode === "Slow" ? "Slow" : "Fast";
  ui.maxTokens.value = settings.maxTokens || "";
  ui.temperature.value = settings.temperature ?? "";
  ui.thinking.value = settings.thinking || "";
  ui.composer.addEventListener("submit", (event) => {
    event.preventDefault();
    const text = ui.prompt.value.trim();
    if (!text || controller) return;
    ui.prompt.value = "";
    send(text);
  });
  ui.prompt.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      ui.composer.requestSubmit();
    }
  });
  ui.stop.addEventListener("click", () => controller?.abort());
  ui.newChat.addEventListener("click", () => {
    if (controller) return;
    const chat = newChat();
    state.chats.unshift(chat);
    state.current = chat.id;
    save();
    renderAll();
    showError("");
  });
  for (const input of [ui.artifact, ui.artifactMode, ui.maxTokens, ui.temperature, ui.thinking, ui.model]) {
    input.addEventListener("change", readSettings);
  }
  ui.apiKey.addEventListener("change", () => {
    readSettings();
    refreshModels();
  });
  setBusy(false);
  renderAll();
  refreshModels().then(() => { document.body.dataset.ready = "true"; });
}

start();
