"""PACS settings: the errors, the config file, endpoints and their credentials, the retry policy.

Where an endpoint comes from (:func:`resolve_endpoint`): a URL or the name of an endpoint of the
config file (:func:`load_config`: TOML or JSON, ``--config FILE``, ``$CA_PACS_CONFIG`` or
``pacs.toml``/``pacs.json`` in the per-user config folder), else ``$CA_PACS_URL``, else the config
file's ``default``. Credentials: the URL's ``user:password@`` part, else the named endpoint's
``username``/``password`` (or ``password_env``, the name of a variable holding it), else
``$CA_PACS_USER``/``$CA_PACS_PASSWORD``; a bearer token from ``token``/``token_env`` or
``$CA_PACS_TOKEN``. Secrets are kept out of every URL, message and ``repr`` (:meth:`Endpoint.display`,
:meth:`Endpoint.redact`, :func:`mask_url`).

Two protocols, chosen by the endpoint's URL: DICOMweb, ``http(s)://host:port/dicom-web`` (the
service root), and DIMSE, ``dicom://CALLED_AET@host:port``, under the calling AE title
:data:`DEFAULT_CALLING_AET` unless configured otherwise.

Part of :mod:`.pacs` (the facade that re-exports the public API); standard library only.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, TypeVar, Union
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

from .registry import APP_NAME

if TYPE_CHECKING:
    from .pacs_send import SendReport

PathLike = Union[str, "os.PathLike[str]"]
T = TypeVar("T")

ENV_URL = "CA_PACS_URL"
ENV_USER = "CA_PACS_USER"
ENV_PASSWORD = "CA_PACS_PASSWORD"
ENV_TOKEN = "CA_PACS_TOKEN"
ENV_CALLING_AET = "CA_PACS_CALLING_AET"
ENV_CONFIG = "CA_PACS_CONFIG"
CONFIG_NAMES = ("pacs.toml", "pacs.json")
DEFAULT_CALLING_AET = "CONTRASTAMP"
DEFAULT_DIMSE_PORT = 104
DEFAULT_TIMEOUT_S = 30.0
_MASK = "***"
_SECRET_QUERY_KEYS = re.compile(r"token|key|pass|secret|sig|auth|code", re.IGNORECASE)


# -- errors ------------------------------------------------------------------------------------


class PacsError(ValueError):
    """A PACS operation that could not be done; the message names the endpoint and the fix.

    A ``ValueError``: the command lines print it as one ``error:`` line and exit 2.

    Attributes:
        attempts: how many times the failing request was tried (0 when none was made).
        report: what was acknowledged before the failure (:class:`SendReport`), when sending.
    """

    def __init__(self, message: str, attempts: int = 0, report: Optional[SendReport] = None):
        super().__init__(message)
        self.attempts = attempts
        self.report = report


class PacsConfigError(PacsError):
    """The endpoint, config file, rules file or an option is wrong (nothing was sent)."""


class PacsRefused(PacsError):
    """The PACS answered and refused (HTTP 4xx, association rejected): retrying would not help."""


class PacsUnreachable(PacsError):
    """The PACS did not answer usefully (connection error, timeout, HTTP 5xx) after every retry."""


class StudyNotFoundError(PacsConfigError):
    """The PACS holds no study with the Study Instance UID given."""


class SeriesSelectionError(PacsError):
    """Fetch could not pick exactly one series per modality; the message lists the study's series."""


# -- configuration -------------------------------------------------------------------------------


def _fallback_user_config_dir(app_name: str) -> Path:
    """``platformdirs.user_config_dir(app_name, appauthor=False)`` without platformdirs."""
    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA") or os.path.join(os.path.expanduser("~"), "AppData", "Local")
        return Path(base) / app_name
    if sys.platform == "darwin":
        return Path(os.path.expanduser("~/Library/Application Support")) / app_name
    xdg = os.environ.get("XDG_CONFIG_HOME", "")
    return Path(xdg if os.path.isabs(xdg) else os.path.expanduser("~/.config")) / app_name


def user_config_dir() -> Path:
    """The per-user config folder of the extension (platformdirs' ``user_config_dir``)."""
    try:
        from platformdirs import user_config_dir as platform_user_config_dir
    except ImportError:
        return _fallback_user_config_dir(APP_NAME)
    return Path(platform_user_config_dir(APP_NAME, appauthor=False))


def default_config_path() -> Path:
    """The config file used without ``--config``: ``$CA_PACS_CONFIG``, else the first of
    ``pacs.toml``/``pacs.json`` in :func:`user_config_dir` that exists (``pacs.toml`` when neither)."""
    override = os.environ.get(ENV_CONFIG)
    if override:
        return Path(override)
    folder = user_config_dir()
    for name in CONFIG_NAMES:
        if (folder / name).is_file():
            return folder / name
    return folder / CONFIG_NAMES[0]


def read_mapping(path: Path, what: str) -> dict[str, Any]:
    """A TOML (``.toml``) or JSON file's top-level table.

    Raises:
        PacsConfigError: unreadable, not parseable, or not a table; TOML on Python < 3.11 without tomli.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PacsConfigError(f"cannot read the {what} {path}: {exc.strerror or exc}. Check the path.") from exc
    except UnicodeDecodeError as exc:
        raise PacsConfigError(f"the {what} {path} is not UTF-8 text ({exc.reason} at byte {exc.start}); save it as "
                              "UTF-8.") from exc
    try:
        if path.suffix.lower() == ".toml":
            data = _toml_module().loads(text)
        else:
            data = json.loads(text)
    except ValueError as exc:  # json.JSONDecodeError and tomllib.TOMLDecodeError are ValueErrors
        raise PacsConfigError(f"the {what} {path} is not valid {path.suffix.lstrip('.').upper() or 'JSON'}: {exc}. "
                              "Fix the file.") from exc
    if not isinstance(data, dict):
        raise PacsConfigError(f"the {what} {path} must hold a table of settings, not {type(data).__name__}.")
    return data


def _toml_module() -> Any:
    """``tomllib`` (Python >= 3.11) or ``tomli``."""
    for name in ("tomllib", "tomli"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise PacsConfigError("reading a .toml file needs Python >= 3.11 or the tomli package: `pip install tomli`, or write "
                          "the same settings as JSON (pacs.json).")


_TOP_KEYS = {"default", "calling_aet", "retries", "backoff_s", "timeout_s", "endpoints"}
_ENDPOINT_KEYS = {"url", "username", "password", "password_env", "token", "token_env", "calling_aet", "timeout_s"}


def check_keys(table: Mapping[str, Any], allowed: set[str], where: str) -> None:
    """Refuse the keys of ``table`` that are not ``allowed`` (typos would otherwise be ignored)."""
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise PacsConfigError(f"{where}: unknown setting(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}.")


@dataclass(frozen=True)
class PacsConfig:
    """The PACS config file's settings (all optional).

    Attributes:
        path: the file read (``None``: no file).
        default: name of the endpoint used when none is given.
        calling_aet: the calling AE title of C-STORE (default :data:`DEFAULT_CALLING_AET`).
        retries, backoff_s: the :class:`RetryPolicy` of every request.
        timeout_s: network timeout of one request or association step, seconds.
        endpoints: name -> table with ``url`` and optionally ``username``, ``password``,
            ``password_env``, ``token``, ``token_env``, ``calling_aet``, ``timeout_s``.
    """

    path: Optional[Path] = None
    default: Optional[str] = None
    calling_aet: Optional[str] = None
    retries: Optional[int] = None
    backoff_s: Optional[float] = None
    timeout_s: Optional[float] = None
    endpoints: Mapping[str, Mapping[str, Any]] = field(default_factory=dict, repr=False)

    def where(self) -> str:
        """The config file's path for messages (the default path when none was read)."""
        return str(self.path) if self.path is not None else f"{default_config_path()} (not present)"

    def retry_policy(self, retries: Optional[int] = None, backoff_s: Optional[float] = None) -> RetryPolicy:
        """The retry policy: the arguments, else the file's settings, else :class:`RetryPolicy`'s defaults."""
        base = RetryPolicy()
        return RetryPolicy(retries=_first(retries, self.retries, base.retries),
                           backoff_s=_first(backoff_s, self.backoff_s, base.backoff_s))


def _first(*values: Optional[T]) -> T:
    for value in values:
        if value is not None:
            return value
    raise AssertionError("no value")  # pragma: no cover - the last argument is never None


def load_config(path: Optional[PathLike] = None) -> PacsConfig:
    """Read the PACS config file: ``path``, else :func:`default_config_path` when that file exists.

    Example (``pacs.toml``)::

        default = "hospital"
        calling_aet = "CONTRASTAMP"
        retries = 3
        backoff_s = 1.0

        [endpoints.hospital]
        url = "https://pacs.example.org/dicom-web"
        username = "svc-contrast"
        password_env = "HOSPITAL_PACS_PASSWORD"

        [endpoints.archive]
        url = "dicom://ARCHIVE@10.0.0.5:104"

    Raises:
        PacsConfigError: ``path`` given but missing, or a file that is not valid.
    """
    if path is None:
        candidate = default_config_path()
        if not candidate.is_file():
            return PacsConfig()
        path = candidate
    path = Path(path)
    if not path.is_file():
        raise PacsConfigError(f"PACS config file {path} not found; create it (see `contrast-amplifier pacs --help`) or "
                              "drop --config to use the URL and environment variables only.")
    data = read_mapping(path, "PACS config file")
    check_keys(data, _TOP_KEYS, f"PACS config file {path}")
    endpoints = data.get("endpoints", {})
    if not isinstance(endpoints, dict) or not all(isinstance(v, dict) for v in endpoints.values()):
        raise PacsConfigError(f"PACS config file {path}: `endpoints` must map names to tables ([endpoints.NAME] with url = ...).")
    for name, entry in endpoints.items():
        check_keys(entry, _ENDPOINT_KEYS, f"PACS config file {path}, endpoint {name!r}")
        if not isinstance(entry.get("url"), str):
            raise PacsConfigError(f"PACS config file {path}, endpoint {name!r}: `url` (a string) is required.")
    try:
        return PacsConfig(path=path, default=data.get("default"), calling_aet=data.get("calling_aet"),
                          retries=None if data.get("retries") is None else int(data["retries"]),
                          backoff_s=None if data.get("backoff_s") is None else float(data["backoff_s"]),
                          timeout_s=None if data.get("timeout_s") is None else float(data["timeout_s"]),
                          endpoints=endpoints)
    except (TypeError, ValueError) as exc:
        raise PacsConfigError(f"PACS config file {path}: retries, backoff_s and timeout_s must be numbers ({exc}).") from exc


# -- endpoints -----------------------------------------------------------------------------------


def mask_url(url: str) -> str:
    """``url`` with its password (and the values of token-like query parameters) replaced by ``***``.

    ``https://user:secret@host/dicom-web`` -> ``https://user:***@host/dicom-web``; a URL without
    secrets comes back unchanged.
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        return _MASK
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}:{_MASK}@{host}" if ":" in userinfo else f"{userinfo}@{host}"
    query = parts.query
    if query:
        pairs = [(k, _MASK if _SECRET_QUERY_KEYS.search(k) else v) for k, v in parse_qsl(query, keep_blank_values=True)]
        query = urlencode(pairs, safe="*")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


@dataclass(frozen=True)
class Endpoint:
    """A resolved PACS endpoint. Secrets are left out of ``repr`` and of :meth:`display`.

    Attributes:
        url: the URL without credentials: ``http(s)://host:port/root`` or ``dicom://CALLED@host:port``.
        name: the config file's name for it ("" for a URL given directly).
        username, password: HTTP basic authentication (DICOMweb).
        token: bearer token (DICOMweb; sent as ``Authorization: Bearer``).
        calling_aet: our AE title (DIMSE).
        timeout_s: network timeout, seconds.
        source: where it came from, for error messages ("--to", "$CA_PACS_URL", "config file X").
    """

    url: str
    name: str = ""
    username: Optional[str] = field(default=None, repr=False)
    password: Optional[str] = field(default=None, repr=False)
    token: Optional[str] = field(default=None, repr=False)
    calling_aet: str = DEFAULT_CALLING_AET
    timeout_s: float = DEFAULT_TIMEOUT_S
    source: str = ""

    @property
    def protocol(self) -> str:
        """``"dimse"`` for ``dicom://`` URLs, ``"dicomweb"`` for http(s)."""
        return "dimse" if self.url.startswith("dicom://") else "dicomweb"

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or ""

    @property
    def port(self) -> int:
        parts = urlsplit(self.url)
        if parts.port is not None:
            return parts.port
        return DEFAULT_DIMSE_PORT if self.protocol == "dimse" else (443 if parts.scheme == "https" else 80)

    @property
    def called_aet(self) -> str:
        """The PACS's AE title (DIMSE): the user part of ``dicom://CALLED@host:port``."""
        return unquote(urlsplit(self.url).username or "")

    def display(self) -> str:
        """The endpoint for messages: ``name (url)``, with ``user:***@`` when credentials are set."""
        url = mask_url(self.url)
        if self.protocol == "dicomweb" and (self.username or self.password):
            parts = urlsplit(url)
            user = quote(self.username or "", safe="")
            url = urlunsplit((parts.scheme, f"{user}:{_MASK}@{parts.netloc}", parts.path, parts.query, parts.fragment))
        return f"{self.name} ({url})" if self.name else url

    def __str__(self) -> str:
        return self.display()

    def redact(self, text: str) -> str:
        """``text`` with every secret of this endpoint replaced by ``***`` (for messages from libraries)."""
        for secret in (self.password, self.token):
            if secret:
                text = text.replace(secret, _MASK)
                quoted = quote(secret, safe="")
                if quoted != secret:
                    text = text.replace(quoted, _MASK)
        return text


def _check_aet(title: str, what: str, fix: str) -> str:
    """An AE title: 1 to 16 characters, printable ASCII without backslash, not only spaces."""
    if not (0 < len(title) <= 16) or not title.strip() or any(not (32 <= ord(c) < 127) or c == "\\" for c in title):
        raise PacsConfigError(f"{what} {title!r} is not a valid AE title (1 to 16 characters, letters, digits, no "
                              f"backslash); {fix}.")
    return title


def _split_url(url: str, where: str) -> tuple[str, Optional[str], Optional[str]]:
    """``url`` without credentials, and the user name and password it held.

    Raises:
        PacsConfigError: not an http(s):// or dicom:// URL with a host (and, for dicom://, a called AE title).
    """
    try:
        parts = urlsplit(url.strip())
        parts.port  # noqa: B018 - raises ValueError on a port that is not a number
    except ValueError as exc:
        raise PacsConfigError(f"{where}: {mask_url(url)!r} is not a valid URL ({exc}).") from exc
    scheme = parts.scheme.lower()
    example = "https://host:port/dicom-web (DICOMweb) or dicom://CALLED_AET@host:port (DIMSE)"
    if scheme not in ("http", "https", "dicom") or not parts.hostname:
        raise PacsConfigError(f"{where}: {mask_url(url)!r} is not a PACS URL; use {example}.")
    host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
    netloc = host if parts.port is None else f"{host}:{parts.port}"
    if scheme == "dicom":
        if parts.password is not None:
            raise PacsConfigError(f"{where}: a dicom:// URL holds the called AE title only (dicom://CALLED_AET@host:port), "
                                  "no password.")
        called = unquote(parts.username or "")
        _check_aet(called, f"{where}: called AE title", "write the PACS's AE title before the @: dicom://CALLED_AET@host:port")
        return urlunsplit(("dicom", f"{quote(called, safe='')}@{netloc}", "", "", "")), None, None
    clean = urlunsplit((scheme, netloc, parts.path.rstrip("/"), parts.query, ""))
    user = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password else None
    return clean, user, password


def _secret(entry: Mapping[str, Any], key: str, env: Mapping[str, str], where: str) -> Optional[str]:
    """``entry[key]``, or the environment variable named by ``entry[key + "_env"]``."""
    if entry.get(key):
        return str(entry[key])
    variable = entry.get(f"{key}_env")
    if variable:
        value = env.get(str(variable))
        if not value:
            raise PacsConfigError(f"{where}: {key}_env names ${variable}, which is not set; set it or remove {key}_env.")
        return value
    return None


def _pick_target(target: Optional[str], config: PacsConfig, env: Mapping[str, str]) -> tuple[str, str]:
    """The endpoint named or given, and where it came from."""
    if target:
        return target, "the command line"
    if env.get(ENV_URL):
        return env[ENV_URL], f"${ENV_URL}"
    if config.default:
        return config.default, f"`default` of {config.where()}"
    if len(config.endpoints) == 1:
        return next(iter(config.endpoints)), f"the only endpoint of {config.where()}"
    names = f" (endpoints there: {', '.join(sorted(config.endpoints))})" if config.endpoints else ""
    raise PacsConfigError(f"no PACS given: pass --to/--from with a URL (https://host/dicom-web or dicom://AET@host:port) or "
                          f"an endpoint name, set ${ENV_URL}, or set `default` in {config.where()}{names}.")


def resolve_endpoint(target: Optional[str] = None, config: Optional[PacsConfig] = None, calling_aet: Optional[str] = None,
                     timeout_s: Optional[float] = None, environ: Optional[Mapping[str, str]] = None) -> Endpoint:
    """The :class:`Endpoint` for ``target``: a URL, or the name of an endpoint of ``config``.

    Without ``target``: ``$CA_PACS_URL``, else the config's ``default``, else its only endpoint.
    Calling AE title: ``calling_aet``, else ``$CA_PACS_CALLING_AET``, else the endpoint's, else the
    config's, else :data:`DEFAULT_CALLING_AET`.

    Raises:
        PacsConfigError: no endpoint, an unknown name, or a URL or AE title that is not valid.
    """
    env = os.environ if environ is None else environ
    config = config or PacsConfig()
    target, source = _pick_target(target, config, env)
    name = ""
    entry: Mapping[str, Any] = {"url": target}
    if "://" not in target:
        if target not in config.endpoints:
            known = ", ".join(sorted(config.endpoints)) or "none"
            raise PacsConfigError(f"{target!r} is neither a PACS URL nor an endpoint of {config.where()} (endpoints: {known}); "
                                  "pass a URL such as https://host/dicom-web or dicom://AET@host:port, or add "
                                  f"[endpoints.{target}] with url = ... to that file.")
        name, entry = target, config.endpoints[target]
        source = f"endpoint {target!r} of {config.where()}"
    url, user, password = _split_url(str(entry["url"]), source)
    user = user or entry.get("username") or env.get(ENV_USER) or None
    password = password or _secret(entry, "password", env, source) or env.get(ENV_PASSWORD) or None
    token = _secret(entry, "token", env, source) or env.get(ENV_TOKEN) or None
    calling = calling_aet or env.get(ENV_CALLING_AET) or entry.get("calling_aet") or config.calling_aet or DEFAULT_CALLING_AET
    _check_aet(str(calling), "calling AE title", f"pass --calling-aet, set ${ENV_CALLING_AET} or calling_aet in {config.where()}")
    timeout = _first(timeout_s, entry.get("timeout_s"), config.timeout_s, DEFAULT_TIMEOUT_S)
    try:
        timeout = float(timeout)
    except (TypeError, ValueError):
        raise PacsConfigError(f"{source}: timeout_s must be a number of seconds, not {timeout!r}.") from None
    return Endpoint(url=url, name=name, username=None if user is None else str(user), password=password, token=token,
                    calling_aet=str(calling), timeout_s=float(timeout), source=source)


def endpoint_and_policy(target: Optional[str], config_file: Optional[PathLike] = None, retries: Optional[int] = None,
                        backoff_s: Optional[float] = None, timeout_s: Optional[float] = None,
                        calling_aet: Optional[str] = None) -> tuple[Endpoint, RetryPolicy]:
    """The endpoint and retry policy of a command line: its options, else the config file, else the environment.

    ``config_file`` ``None`` reads :func:`default_config_path` when that file exists; ``target``
    ``None`` takes the default endpoint (:func:`resolve_endpoint`).

    Raises:
        PacsConfigError: as :func:`load_config` and :func:`resolve_endpoint`.
    """
    config = load_config(config_file)
    endpoint = resolve_endpoint(target, config, calling_aet=calling_aet, timeout_s=timeout_s)
    return endpoint, config.retry_policy(retries, backoff_s)


# -- retries -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of a request that failed in a way a retry may fix, with exponential backoff.

    Attempt ``n`` (1-based) that fails is followed, when ``n <= retries``, by a pause of
    ``min(max_backoff_s, backoff_s * 2 ** (n - 1))`` seconds and another attempt.

    Attributes:
        retries: attempts after the first (0: one attempt).
        backoff_s: the first pause, seconds.
        max_backoff_s: the longest pause.
        sleep: how to pause (``time.sleep``; tests pass a recorder).
    """

    retries: int = 3
    backoff_s: float = 1.0
    max_backoff_s: float = 30.0
    sleep: Callable[[float], None] = field(default=time.sleep, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.retries < 0 or self.backoff_s < 0:
            raise PacsConfigError(f"retries ({self.retries}) and backoff ({self.backoff_s} s) cannot be negative.")

    @property
    def attempts(self) -> int:
        return self.retries + 1

    def delay(self, attempt: int) -> float:
        """The pause after failed attempt ``attempt`` (1-based), seconds."""
        return float(min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1)))

