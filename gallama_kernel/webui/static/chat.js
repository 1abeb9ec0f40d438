// Talking to gallama's OpenAI API (fetch, server-sent events) and keeping conversations in localStorage.

export class ApiError extends Error {}

function headers(apiKey) {
  const sent = { "Content-Type": "application/json" };
  if (apiKey) sent.Authorization = `Bearer ${apiKey}`;
  return sent;
}

// The message of an OpenAI error body ({"error": {"message": …}}), or a description of the response.
async function errorOf(response) {
  let text = "";
  try {
    text = await response.text();
    const body = JSON.parse(text);
    if (body && body.error && typeof body.error.message === "string") return new ApiError(body.error.message);
  } catch {
    // not JSON: reported below
  }
  return new ApiError(`HTTP ${response.status} ${response.statusText}${text ? `: ${text.slice(0, 300)}` : ""}`);
}

export async function listModels(apiKey) {
  const response = await fetch("/v1/models", { headers: headers(apiKey) });
  if (!response.ok) throw await errorOf(response);
  const body = await response.json();
  return (body.data || []).map((model) => model.id);
}

// POST a streamed chat completion; yields each chunk object. An error body, before or inside the stream
// (a `data: {"error": …}` event), throws ApiError; aborting `signal` throws the fetch's AbortError.
export async function* streamChat(body, apiKey, signal) {
  const response = await fetch("/v1/chat/completions", {
    method: "POST", headers: headers(apiKey), body: JSON.stringify(body), signal,
  });
  if (!response.ok) throw await errorOf(response);
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      buffer += decoder.decode(value || new Uint8Array(), { stream: !done });
      const events = buffer.split(/\r?\n\r?\n/);
      buffer = done ? "" : events.pop();
      for (const event of events) {
        const data = event.split(/\r?\n/).filter((line) => line.startsWith("data:"))
          .map((line) => line.slice(5).replace(/^ /, "")).join("\n");
        if (!data) continue; // a comment (keep-alive) or an empty event
        if (data === "[DONE]") return;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new ApiError(chunk.error.message || JSON.stringify(chunk.error));
        yield chunk;
      }
      if (done) return;
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}

// The conversation as the API takes it: the fields the page adds (segments, errors, usage) left out.
export function apiMessages(messages) {
  return messages.filter((m) => !m.error || m.content || (m.segments && m.segments.length)).map((m) => {
    const sent = { role: m.role, content: m.role === "assistant" ? assistantText(m) : m.content ?? "" };
    if (m.tool_calls && m.tool_calls.length) sent.tool_calls = m.tool_calls;
    if (m.tool_call_id) sent.tool_call_id = m.tool_call_id;
    if (m.name) sent.name = m.name;
    return sent;
  });
}

// An assistant message's text for the history: its prose, and its artifacts as fenced code blocks.
export function assistantText(message) {
  if (!message.segments || !message.segments.length) return message.content ?? "";
  return message.segments.map((segment) => {
    if (!segment.meta || segment.meta.tag_type !== "artifact") return segment.content;
    return `\n\`\`\`${segment.meta.language || ""}\n${segment.content}\n\`\`\`\n`;
  }).join("").trim();
}

// Add one streamed delta to an assistant message: content goes to the segment of its artifact_meta (a change of
// artifact_meta starts a new segment), reasoning and tool-call fragments are accumulated.
export function applyDelta(message, delta) {
  if (typeof delta.reasoning_content === "string") {
    message.reasoning_content = (message.reasoning_content || "") + delta.reasoning_content;
  }
  if (typeof delta.content === "string" && delta.content) {
    const meta = delta.artifact_meta || null;
    const segments = message.segments || (message.segments = []);
    const last = segments[segments.length - 1];
    if (last && JSON.stringify(last.meta) === JSON.stringify(meta)) last.content += delta.content;
    else segments.push({ meta, content: delta.content });
    message.content = segments.filter((s) => !s.meta || s.meta.tag_type !== "artifact").map((s) => s.content).join("");
  }
  for (const call of delta.tool_calls || []) {
    const calls = message.tool_calls || (message.tool_calls = []);
    const index = typeof call.index === "number" ? call.index : calls.length;
    const known = calls[index] || (calls[index] = { id: "", type: "function", function: { name: "", arguments: "" } });
    if (call.id) known.id = call.id;
    if (call.function && call.function.name) known.function.name += call.function.name;
    if (call.function && call.function.arguments) known.function.arguments += call.function.arguments;
  }
}

const CHATS_KEY = "gallama.chats";
const SETTINGS_KEY = "gallama.settings";

function read(key, fallback) {
  try {
    const value = JSON.parse(localStorage.getItem(key));
    return value && typeof value === "object" ? value : fallback;
  } catch {
    return fallback;
  }
}

export function loadSettings() {
  return read(SETTINGS_KEY, {});
}

export function saveSettings(settings) {
  localStorage.setItem(SETTINGS_KEY, JSON.stringify(settings));
}

export function loadChats() {
  const stored = read(CHATS_KEY, {});
  const chats = Array.isArray(stored.chats) ? stored.chats.filter((c) => c && Array.isArray(c.messages)) : [];
  return { chats, current: stored.current };
}

export function saveChats(state) {
  localStorage.setItem(CHATS_KEY, JSON.stringify({ chats: state.chats, current: state.current }));
}

export function newChat() {
  const id = `${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 8)}`;
  return { id, title: "New chat", messages: [] };
}
