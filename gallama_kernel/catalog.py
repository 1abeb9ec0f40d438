"""The model catalog: which models ``gallama download NAME:QUANT`` knows, and where each quantization lives.

The built-in entries are data (``catalog.yaml``, shipped in the package; its header documents the format).
Plugins add entries in the same format through the ``register_models`` hook. Every quantization resolves to a
:class:`Download`: a Hugging Face repository and revision, and for GGUF one file of it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from importlib import resources
from typing import TYPE_CHECKING, Any

import yaml

from .config import ConfigError, check_name

if TYPE_CHECKING:
    from .plugins import PluginHost

CATALOG_RESOURCE = "catalog.yaml"
DEFAULT_BACKEND = "exllama"
"""The backend ``gallama download`` picks when ``--backend`` is not given and the model has it."""
KINDS = ("chat", "embedding")
DEFAULT_REVISION = "main"
_REPO = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
_QUANT = re.compile(r"\d{1,3}(\.\d{1,3})?")
_MODEL_KEYS = {"kind", "description", "default_quant", "note", "backends"}
_BACKEND_KEYS = {"repo", "revision", "ignore", "quants"}
_QUANT_KEYS = {"repo", "revision", "file"}


class CatalogError(ConfigError):
    """An unknown model, quantization or backend, or a malformed catalog entry; the message lists what exists."""


def parse_quant(label: object) -> str:
    """Canonical form of a quantization label: ``4`` / ``"4"`` / ``"4.00"`` → ``"4.0"``, ``4.25`` → ``"4.25"``.

    :raises CatalogError: ``label`` is not a number of bits per weight such as ``4.0`` or ``6.5``.
    """
    text = str(label).strip()
    if isinstance(label, bool) or not _QUANT.fullmatch(text):
        raise CatalogError(f"quantization {text!r} is not a number of bits per weight (like 4.0 or 6.5)")
    try:
        value = Decimal(text)
    except InvalidOperation:  # pragma: no cover - the pattern only lets numbers through
        raise CatalogError(f"quantization {text!r} is not a number") from None
    canonical = format(value.normalize(), "f")
    return canonical if "." in canonical else f"{canonical}.0"


def _quant_key(label: str) -> Decimal:
    return Decimal(label)


@dataclass(frozen=True)
class Download:
    """One downloadable quantization of one model for one backend."""

    model: str
    quant: str
    backend: str
    repo: str
    revision: str = DEFAULT_REVISION
    file: str | None = None
    """One file of the repository (GGUF); ``None``: every file of the revision (minus ``ignore``)."""
    ignore: tuple[str, ...] = ()

    @property
    def folder_name(self) -> str:
        """Folder under ``GALLAMA_HOME_PATH/models`` that holds this download: ``<name>-<quant>-<backend>``."""
        return f"{self.model}-{self.quant}-{self.backend}"

    @property
    def source(self) -> str:
        """``repo@revision`` or ``repo@revision:file``, for messages."""
        return f"{self.repo}@{self.revision}" + (f":{self.file}" if self.file else "")

    def as_dict(self) -> dict[str, Any]:
        return {"quant": self.quant, "repo": self.repo, "revision": self.revision, "file": self.file,
                "ignore": list(self.ignore)}


@dataclass
class CatalogModel:
    """A model of the catalog: its quantizations, per backend."""

    name: str
    kind: str
    description: str
    default_quant: str
    note: str | None = None
    plugin: str | None = None
    """The plugin that registered it (``None``: the built-in catalog)."""
    downloads: dict[str, dict[str, Download]] = field(default_factory=dict)

    @property
    def backends(self) -> list[str]:
        return list(self.downloads)

    @property
    def default_backend(self) -> str:
        return DEFAULT_BACKEND if DEFAULT_BACKEND in self.downloads else next(iter(self.downloads))

    def quants(self, backend: str) -> list[str]:
        return sorted(self.downloads.get(backend, {}), key=_quant_key)

    def as_dict(self) -> dict[str, Any]:
        return {"model": self.name, "kind": self.kind, "description": self.description,
                "default_quant": self.default_quant, "default_backend": self.default_backend, "note": self.note,
                "plugin": self.plugin,
                "backends": {backend: [self.downloads[backend][q].as_dict() for q in self.quants(backend)]
                             for backend in self.downloads}}


def _string(value: object, where: str, *, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value.strip():
        raise CatalogError(f"{where}: expected a non-empty string, got {value!r}")
    return value.strip()


def _repo(value: object, where: str) -> str:
    repo = _string(value, where) or ""
    if not _REPO.fullmatch(repo):
        raise CatalogError(f"{where}: {repo!r} is not a Hugging Face repository id (owner/name)")
    return repo


def _file(value: object, where: str) -> str:
    name = _string(value, where) or ""
    parts = name.split("/")
    if name.startswith("/") or "\\" in name or any(part in ("", ".", "..") for part in parts):
        raise CatalogError(f"{where}: file {name!r} is refused: it must be a relative path inside the repository "
                           "(no leading '/', no '..')")
    return name


def _mapping(value: object, where: str, allowed: set[str] | None = None) -> dict[str, Any]:
    """``value`` as a dict (``None``: empty); with ``allowed``, a key outside it is an error."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise CatalogError(f"{where}: expected a mapping, got {value!r}")
    unknown = sorted(set(map(str, value)) - allowed) if allowed is not None else []
    if unknown:
        raise CatalogError(f"{where}: unknown key(s) {', '.join(unknown)} (allowed: {', '.join(sorted(allowed))})")
    return dict(value)


def parse_entry(name: str, entry: object, plugin: str | None = None) -> CatalogModel:
    """Validate one catalog entry (the format of ``catalog.yaml``) into a :class:`CatalogModel`.

    :raises CatalogError: the entry is malformed, or a name would make a download escape its folder.
    """
    try:
        check_name(str(name), "model name")
    except ConfigError as error:
        raise CatalogError(str(error)) from None
    where = f"catalog entry '{name}'"
    data = _mapping(entry, where, _MODEL_KEYS)
    kind = data.get("kind", "chat")
    if kind not in KINDS:
        raise CatalogError(f"{where}: kind {kind!r} is not one of {', '.join(KINDS)}")
    backends = _mapping(data.get("backends"), f"{where}.backends")
    if not backends:
        raise CatalogError(f"{where}: no backends")
    model = CatalogModel(name=name, kind=kind, description=_string(data.get("description", name), where) or name,
                         default_quant=parse_quant(data.get("default_quant", "")),
                         note=_string(data.get("note"), f"{where}.note", optional=True), plugin=plugin)
    for backend, section in backends.items():
        try:
            check_name(str(backend), "backend name")
        except ConfigError as error:
            raise CatalogError(f"{where}: {error}") from None
        here = f"{where}.backends.{backend}"
        section = _mapping(section, here, _BACKEND_KEYS)
        ignore = section.get("ignore") or []
        if not isinstance(ignore, list) or not all(isinstance(p, str) and p for p in ignore):
            raise CatalogError(f"{here}.ignore: expected a list of file patterns, got {ignore!r}")
        quants = _mapping(section.get("quants"), f"{here}.quants")
        if not quants:
            raise CatalogError(f"{here}: no quants")
        found: dict[str, Download] = {}
        for label, spec in quants.items():
            quant = parse_quant(label)
            there = f"{here}.quants.{label}"
            if quant in found:
                raise CatalogError(f"{there}: quantization {quant} is listed twice")
            spec = _mapping(spec, there, _QUANT_KEYS)
            repo = spec.get("repo", section.get("repo"))
            if repo is None:
                raise CatalogError(f"{there}: no repo (give one here or for the backend)")
            revision = spec.get("revision", section.get("revision", DEFAULT_REVISION))
            found[quant] = Download(
                model=name, quant=quant, backend=str(backend), repo=_repo(repo, f"{there}.repo"),
                revision=_string(revision, f"{there}.revision (quote it: \"4_0\")") or DEFAULT_REVISION,
                file=_file(spec["file"], f"{there}.file") if "file" in spec else None, ignore=tuple(ignore))
        model.downloads[str(backend)] = found
    if model.default_quant not in model.downloads[model.default_backend]:
        raise CatalogError(f"{where}: default_quant {model.default_quant} is not a quantization of its default "
                           f"backend {model.default_backend} ({', '.join(model.quants(model.default_backend))})")
    return model


class Catalog:
    """Every model ``gallama download`` knows: the built-in ``catalog.yaml`` plus what plugins register."""

    def __init__(self) -> None:
        self.models: dict[str, CatalogModel] = {}

    def __iter__(self) -> Iterator[CatalogModel]:
        return iter(self.models.values())

    def __len__(self) -> int:
        return len(self.models)

    def add(self, name: str, entry: Mapping[str, Any], plugin: str | None = None) -> CatalogModel:
        """Validate and add one entry; a name already in the catalog is an error.

        :raises CatalogError: malformed entry, refused name, or a name registered twice.
        """
        if name in self.models:
            owner = self.models[name].plugin or "the built-in catalog"
            raise CatalogError(f"model '{name}' is already in the catalog (from {owner})")
        model = parse_entry(name, entry, plugin)
        self.models[name] = model
        return model

    @classmethod
    def from_yaml(cls, text: str, source: str = CATALOG_RESOURCE) -> Catalog:
        data = yaml.safe_load(text) or {}
        if not isinstance(data, dict):
            raise CatalogError(f"{source}: expected a mapping of model name -> entry")
        catalog = cls()
        for name, entry in data.items():
            catalog.add(str(name), entry)
        return catalog

    def resolve(self, name: str, quant: str | None = None, backend: str | None = None) -> Download:
        """The download for ``name`` at ``quant`` (default: the model's ``default_quant``) on ``backend``
        (default: ``exllama`` where the model has it, else its only or first backend).

        :raises CatalogError: unknown name, backend or quantization; the message lists what exists.
        """
        model = self.models.get(name)
        if model is None:
            raise CatalogError(f"unknown model '{name}'. Models in the catalog: {', '.join(self.models)} "
                               "(gallama list available)")
        chosen = backend or model.default_backend
        if chosen not in model.downloads:
            raise CatalogError(f"model '{name}' has no download for backend '{chosen}'. Backends: "
                               + "; ".join(f"{b} ({', '.join(model.quants(b))})" for b in model.downloads))
        if quant is None:
            label = model.default_quant
            if label not in model.downloads[chosen]:
                raise CatalogError(f"model '{name}' on backend '{chosen}': give a quantization, one of "
                                   f"{', '.join(model.quants(chosen))} (gallama download {name}:QUANT)")
        else:
            try:
                label = parse_quant(quant)
            except CatalogError:
                label = None
            if label not in model.downloads[chosen]:
                others = [f"{b} ({', '.join(model.quants(b))})" for b in model.downloads if b != chosen]
                hint = f"; other backends: {'; '.join(others)}" if others else ""
                raise CatalogError(f"model '{name}' has no quantization '{quant}' for backend '{chosen}'. "
                                   f"Quantizations: {', '.join(model.quants(chosen))}{hint}")
        return model.downloads[chosen][label]


def split_reference(reference: str) -> tuple[str, str | None]:
    """``"qwen-2.5-7B:4.0"`` → ``("qwen-2.5-7B", "4.0")``; ``"qwen-2.5-7B"`` → ``("qwen-2.5-7B", None)``."""
    name, sep, quant = reference.partition(":")
    return name.strip(), (quant.strip() if sep else None)


def builtin_catalog() -> Catalog:
    """The catalog shipped with gallama (``gallama_kernel/catalog.yaml``)."""
    text = resources.files(__package__).joinpath(CATALOG_RESOURCE).read_text(encoding="utf-8")
    return Catalog.from_yaml(text)


def load_catalog(host: PluginHost | None = None) -> Catalog:
    """The built-in catalog plus the entries plugins register through ``register_models``.

    A plugin whose entry is refused (malformed, a name already taken, a name that is not a plain name) is recorded
    as failed against that plugin (``gallama plugins`` shows it); the other entries stay.
    """
    catalog = builtin_catalog()
    if host is not None:
        def registrar(plugin: str) -> Any:
            def register(name: str, entry: Mapping[str, Any]) -> None:
                catalog.add(name, entry, plugin)

            return register

        host.call_each("register_models", per_plugin=lambda plugin: {"register": registrar(plugin)})
    return catalog
