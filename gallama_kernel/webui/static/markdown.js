// A small, safe Markdown subset rendered to DOM nodes (never HTML strings): paragraphs, headings, emphasis,
// inline code, fenced code blocks, block quotes, lists and http(s) links. Any HTML in the text stays text.
import { highlight } from "./highlight.js";

const FENCE = /^\s*(```|~~~)\s*([\w+#.-]*)\s*$/;
const HEADING = /^(#{1,6})\s+(.*)$/;
const BULLET = /^\s*[-*+]\s+(.*)$/;
const NUMBERED = /^\s*\d{1,9}[.)]\s+(.*)$/;
const QUOTE = /^\s*>\s?(.*)$/;

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

export function codeBlock(code, language) {
  const pre = el("pre", "code");
  const element = el("code");
  if (language) element.dataset.language = language;
  element.append(highlight(code, language));
  pre.append(element);
  return pre;
}

// Inline markup: `code`, **strong** / __strong__, *em* / _em_ (underscores not inside words), [text](http(s) url), bare http(s) urls.
const INLINE = /(`+)([\s\S]*?[^`])\1(?!`)|\*\*([^*\s](?:[^*]*?[^*\s])?)\*\*|(?<![\w.])__([^_\s](?:[^_]*?[^_\s])?)__(?!\w)|\*([^*\s](?:[^*]*?[^*\s])?)\*|(?<![\w.])_([^_\s](?:[^_]*?[^_\s])?)_(?!\w)|\[([^\]]+)\]\(([^)\s]+)\)|(https?:\/\/[^\s<>()]+[^\s<>().,;:!?'"])/g;

function safeUrl(url) {
  try {
    const parsed = new URL(url);
    return parsed.protocol === "http:" || parsed.protocol === "https:" ? parsed.href : null;
  } catch {
    return null;
  }
}

function link(text, url) {
  const href = safeUrl(url);
  if (href === null) return document.createTextNode(text === url ? url : `[${text}](${url})`);
  const anchor = el("a", null, text);
  anchor.href = href;
  anchor.rel = "noopener noreferrer nofollow";
  anchor.target = "_blank";
  return anchor;
}

export function inline(text) {
  const fragment = document.createDocumentFragment();
  let last = 0;
  for (const match of text.matchAll(INLINE)) {
    if (match.index > last) fragment.append(text.slice(last, match.index));
    const [whole, , code, strong1, strong2, em1, em2, linkText, linkUrl, bare] = match;
    if (code !== undefined) fragment.append(el("code", null, code.trim() || code));
    else if (strong1 !== undefined || strong2 !== undefined) {
      const node = el("strong");
      node.append(inline(strong1 ?? strong2));
      fragment.append(node);
    } else if (em1 !== undefined || em2 !== undefined) {
      const node = el("em");
      node.append(inline(em1 ?? em2));
      fragment.append(node);
    } else if (linkText !== undefined) fragment.append(link(linkText, linkUrl));
    else if (bare !== undefined) fragment.append(link(bare, bare));
    else fragment.append(whole);
    last = match.index + whole.length;
  }
  if (last < text.length) fragment.append(text.slice(last));
  return fragment;
}

function paragraph(lines) {
  const node = el("p");
  lines.forEach((line, index) => {
    if (index) node.append(el("br"));
    node.append(inline(line));
  });
  return node;
}

// Markdown text -> DocumentFragment. An unclosed fence (a stream still arriving) is a code block to the end.
export function render(text) {
  const fragment = document.createDocumentFragment();
  const lines = String(text ?? "").replace(/\r\n?/g, "\n").split("\n");
  let i = 0;
  let para = [];
  const flush = () => {
    if (para.length) fragment.append(paragraph(para));
    para = [];
  };
  while (i < lines.length) {
    const line = lines[i];
    const fence = line.match(FENCE);
    if (fence) {
      flush();
      const body = [];
      i += 1;
      while (i < lines.length && !(lines[i].trim().startsWith(fence[1]) && lines[i].trim().replaceAll(fence[1][0], "") === "")) {
        body.push(lines[i]);
        i += 1;
      }
      i += 1;
      fragment.append(codeBlock(body.join("\n"), fence[2]));
      continue;
    }
    const heading = line.match(HEADING);
    if (heading) {
      flush();
      const node = el(`h${Math.min(heading[1].length + 2, 6)}`);
      node.append(inline(heading[2]));
      fragment.append(node);
      i += 1;
      continue;
    }
    const bullet = line.match(BULLET);
    const numbered = bullet ? null : line.match(NUMBERED);
    if (bullet || numbered) {
      flush();
      const pattern = bullet ? BULLET : NUMBERED;
      const list = el(bullet ? "ul" : "ol");
      while (i < lines.length && lines[i].match(pattern)) {
        const item = el("li");
        item.append(inline(lines[i].match(pattern)[1]));
        list.append(item);
        i += 1;
      }
      fragment.append(list);
      continue;
    }
    if (QUOTE.test(line)) {
      flush();
      const quoted = [];
      while (i < lines.length && QUOTE.test(lines[i])) {
        quoted.push(lines[i].match(QUOTE)[1]);
        i += 1;
      }
      const node = el("blockquote");
      node.append(render(quoted.join("\n")));
      fragment.append(node);
      continue;
    }
    if (line.trim() === "") flush();
    else para.push(line);
    i += 1;
  }
  flush();
  return fragment;
}
