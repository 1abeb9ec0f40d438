"""The model's own tokenizer, read from a local Hugging Face folder, for engines that cannot tokenize for gallama.

vLLM and SGLang have a ``/tokenize`` endpoint, but it always reads special-token text as control tokens, so a
client could write ``<|im_end|>`` into its message and close the turn; other OpenAI servers have none. gallama
then tokenizes with the served model's ``tokenizer.json`` (the ``tokenizers`` library, as the engines do): client
text with the special tokens' texts read as plain characters, template text with them read as control tokens.
``tokenizer_config.json`` (or ``chat_template.jinja``) gives the chat template and the BOS/EOS texts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gallama_kernel.plugin import BackendError


class LocalTokenizer:
    """``tokenizer.json`` of ``folder`` (a folder, or the file itself)."""

    def __init__(self, location: str) -> None:
        from tokenizers import Tokenizer

        path = Path(location).expanduser()
        folder = path if path.is_dir() else path.parent
        file = path if path.is_file() else path / "tokenizer.json"
        if not file.is_file():
            raise BackendError(f"tokenizer {location}: no tokenizer.json there")
        try:
            self.special = Tokenizer.from_file(str(file))
            self.plain = Tokenizer.from_file(str(file))  # a second instance: its flag is never toggled under load
        except Exception as error:  # the library's own message: a broken or foreign file
            raise BackendError(f"tokenizer {file}: cannot be read ({error})") from None
        self.plain.encode_special_tokens = True
        config = _json(folder / "tokenizer_config.json")
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: the default one
            template = next((t.get("template") for t in template if isinstance(t, dict)
                             and t.get("name") == "default"), None)
        jinja = folder / "chat_template.jinja"
        if not isinstance(template, str) and jinja.is_file():
            template = jinja.read_text(encoding="utf-8")
        self.chat_template: str | None = template if isinstance(template, str) else None
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        added = self.special.get_added_tokens_decoder()
        self.control_texts = frozenset(token.content for token in added.values() if token.special)
        self.added_texts = frozenset(token.content for token in added.values() if not token.special)
        """Added tokens that are not special (``<think>``): ``encode_special_tokens`` leaves them tokens."""
        self.vocab_size = self.special.get_vocab_size(with_added_tokens=True)

    def tokenize(self, text: str, add_special: bool, parse_special: bool) -> list[int]:
        tokenizer = self.special if parse_special else self.plain
        return list(tokenizer.encode(text, add_special_tokens=add_special).ids)

    def detokenize(self, tokens: list[int]) -> str:
        return str(self.special.decode(tokens, skip_special_tokens=False))


def _json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise BackendError(f"{path}: cannot be read ({error})") from None
    return data if isinstance(data, dict) else {}


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None
