"""Size and time limits of one request, checked before any text reaches native code (tokenizers, grammar
compilers). A request over a limit is a 400 naming the limit and its value."""

MAX_MESSAGES = 16_384
"""Messages in one chat request. Each message costs at least ~5 template tokens, so this is beyond what a
128k-token context can hold, while a long agent history (thousands of tool calls and results) still fits."""

MAX_REQUEST_CHARS = 4_000_000
"""Characters of all the text a request carries (messages, tools, stop strings, prompt): ~1M tokens, more than
any served context; bounds rendering and tokenization work (both linear in it)."""

MAX_TOOLS = 256
"""Tools offered in one request (OpenAI allows 128); each one becomes grammar rules and system-prompt text."""

MAX_STOP_STRINGS = 16
"""Stop strings of one request (OpenAI allows 4); each is matched against every generated piece of text."""

MAX_STOP_CHARS = 256
"""Characters of one stop string: the stream holds back that much text while it might be a stop's start."""

MAX_PROMPT_ITEMS = 1_048_576
"""Items of a ``/v1/completions`` ``prompt`` given as a list (token ids): beyond any context length."""

PREPARE_BUDGET_S = 10.0
"""Wall time one request's preparation (plugin hooks, rendering, tokenization, grammar compile) may take in its
worker thread; past it the request is a 400 and the thread's late result is dropped."""

PREPARE_THREADS = 4
"""Worker threads preparing requests at once, so heavy requests cannot take every thread of the process."""

# -- HTTP input (api/http_input.py, the gateway, `gallama run`'s uvicorn settings) --------------

MAX_BODY_BYTES = 8 * 1024 * 1024
"""Largest request body (bytes; GALLAMA_MAX_BODY_BYTES overrides): above it a 413, checked as the body arrives."""

BODY_TIMEOUT_S = 30.0
"""Seconds a client may take to send a whole request body (GALLAMA_BODY_TIMEOUT_S overrides): slower is a 408."""

MAX_JSON_DEPTH = 100
"""Deepest nesting of JSON arrays/objects in a body, checked before parsing: deeper is a 400."""

MAX_MIXTURE_AGENTS = 8
"""Agent models one ``mixture_of_agents`` request may ask (each is a full generation): more is a 400."""

MAX_RELAYED_ERROR_CHARS = 500
"""Longest worker error (a load failure, say) the gateway shows in /health and error bodies; the log has all."""

MAX_HEADER_BYTES = 64 * 1024
"""Largest request head (request line and headers) uvicorn buffers for the gateway before refusing it."""

CLIENT_KEEP_ALIVE_S = 30
"""Seconds the gateway keeps an idle keep-alive client connection open."""

HEADER_TIMEOUT_S = 10.0
"""Seconds a client has to send a request's head (request line and headers), from its connection's start or its
first byte after the previous response; slower: the connection is closed (a client dribbling header bytes would
otherwise hold it for ever, since each byte resets the keep-alive timer)."""
