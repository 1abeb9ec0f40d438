// A small syntax highlighter: keywords, strings, comments and numbers for a handful of languages, as DOM spans
// (text only: the code is never parsed as HTML). Unknown languages come back as plain text.

const C_LIKE = "break case catch class const continue default do else enum export extends false finally for " +
  "function if import in instanceof let new null return static super switch this throw true try typeof var void " +
  "while yield async await of";
const WORDS = {
  python: "False None True and as assert async await break class continue def del elif else except finally for " +
    "from global if import in is lambda nonlocal not or pass raise return try while with yield self print",
  javascript: C_LIKE + " undefined",
  typescript: C_LIKE + " undefined interface type implements private public protected readonly any number string " +
    "boolean",
  java: "abstract boolean break byte case catch char class continue default do double else enum extends final " +
    "finally float for if implements import instanceof int interface long new null package private protected public " +
    "return short static super switch this throw throws true false try void while var String",
  c: "auto break case char const continue default do double else enum extern float for goto if int long register " +
    "return short signed sizeof static struct switch typedef union unsigned void volatile while include define " +
    "class public private protected namespace using template typename new delete true false nullptr bool std",
  go: "break case chan const continue default defer else fallthrough for func go goto if import interface map " +
    "package range return select struct switch type var true false nil",
  rust: "as break const continue crate else enum extern false fn for if impl in let loop match mod move mut pub ref " +
    "return self Self static struct super trait true type unsafe use where while async await dyn",
  shell: "if then else elif fi case esac for while until do done in function return export local echo exit set",
  sql: "select from where insert into values update set delete create table drop alter join left right inner outer " +
    "on group by order having limit and or not null as distinct primary key index",
  css: "",
  html: "",
  json: "true false null",
  yaml: "true false null yes no",
};
const ALIASES = {
  py: "python", js: "javascript", mjs: "javascript", jsx: "javascript", ts: "typescript", tsx: "typescript",
  "c++": "c", cpp: "c", cc: "c", h: "c", hpp: "c", "c#": "c", csharp: "c", cs: "c", kotlin: "java", kt: "java",
  golang: "go", rs: "rust", sh: "shell", bash: "shell", zsh: "shell", console: "shell", xml: "html", svg: "html",
  htm: "html", yml: "yaml", scss: "css",
};
const HASH_COMMENTS = new Set(["python", "shell", "yaml"]);

function language(name) {
  const key = String(name || "").toLowerCase();
  return WORDS[key] !== undefined ? key : ALIASES[key] ?? null;
}

function tokenizer(lang) {
  const parts = [];
  if (lang === "html") parts.push("(?<comment><!--[\\s\\S]*?(?:-->|$))", "(?<keyword></?[A-Za-z][\\w:-]*|/?>)");
  else if (lang === "sql") parts.push("(?<comment>--[^\\n]*)");
  else if (HASH_COMMENTS.has(lang)) parts.push("(?<comment>#[^\\n]*)");
  else if (lang !== "json") parts.push("(?<comment>//[^\\n]*|/\\*[\\s\\S]*?(?:\\*/|$))");
  const triple = lang === "python" ? '"""[\\s\\S]*?(?:"""|$)|\'\'\'[\\s\\S]*?(?:\'\'\'|$)|' : "";
  parts.push("(?<string>" + triple + '"(?:\\\\.|[^"\\\\\\n])*"?|\'(?:\\\\.|[^\'\\\\\\n])*\'?' +
    (lang === "javascript" || lang === "typescript" || lang === "go" ? "|`(?:\\\\.|[^`\\\\])*`?" : "") + ")");
  parts.push("(?<number>\\b(?:0[xX][\\da-fA-F]+|\\d+(?:\\.\\d+)?(?:[eE][+-]?\\d+)?)\\b)");
  parts.push("(?<word>[A-Za-z_$][\\w$]*)");
  return new RegExp(parts.join("|"), "g");
}

function span(className, text) {
  const node = document.createElement("span");
  node.className = className;
  node.textContent = text;
  return node;
}

// code text + language name -> DocumentFragment of text nodes and <span class="tok-…"> nodes.
export function highlight(code, name) {
  const fragment = document.createDocumentFragment();
  const lang = language(name);
  if (lang === null || code.length > 200000) {
    fragment.append(code);
    return fragment;
  }
  const keywords = new Set(WORDS[lang].split(" ").filter(Boolean));
  const caseless = lang === "sql";
  let last = 0;
  for (const match of code.matchAll(tokenizer(lang))) {
    const { comment, keyword, string, number, word } = match.groups;
    let className = null;
    if (comment !== undefined) className = "tok-comment";
    else if (keyword !== undefined) className = "tok-keyword";
    else if (string !== undefined) className = "tok-string";
    else if (number !== undefined) className = "tok-number";
    else if (word !== undefined && keywords.has(caseless ? word.toLowerCase() : word)) className = "tok-keyword";
    if (className === null) continue;
    if (match.index > last) fragment.append(code.slice(last, match.index));
    fragment.append(span(className, match[0]));
    last = match.index + match[0].length;
  }
  if (last < code.length) fragment.append(code.slice(last));
  return fragment;
}
