"""The tracking server as a client sees it: its URI without credentials, whether it answers,
and its errors read as what they mean (unreachable, credentials refused, a store error)."""

from __future__ import annotations

import os

from softmaxlab.core.errors import UserError

# How long a remote tracking server may take to answer before we fall back (see tracker.connect).
REACHABLE_TIMEOUT_S = 5.0


def redact(uri: str) -> str:
    """The URI without user:password@, for anything written to disk or logged."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(uri)
    if parts.username or parts.password:
        host = parts.hostname or ""
        netloc = f"***@{host}" + (f":{parts.port}" if parts.port else "")
        return urlunsplit(parts._replace(netloc=netloc))
    return uri


def redact_text(text: str, uri: str) -> str:
    """`text` (an error message) with the URI's credentials taken out."""
    from urllib.parse import unquote, urlsplit

    text = text.replace(uri, redact(uri))
    password = urlsplit(uri).password
    return text.replace(unquote(password), "***").replace(password, "***") if password else text


def is_remote(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def _health_probe(uri: str) -> tuple[str, dict[str, str]]:
    """<uri>/health and the Authorization header MLflow itself would send: user info in the
    URI, else MLFLOW_TRACKING_USERNAME/PASSWORD, else MLFLOW_TRACKING_TOKEN. urllib refuses a
    URL with user info, so it goes in the header instead."""
    import base64
    from urllib.parse import unquote, urlsplit, urlunsplit

    parts = urlsplit(uri)
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if parts.username is not None:
        user, password = unquote(parts.username), unquote(parts.password or "")
    netloc = parts.hostname + (f":{parts.port}" if parts.port else "") if parts.hostname else parts.netloc
    url = urlunsplit(parts._replace(netloc=netloc)).rstrip("/") + "/health"
    headers = {}
    if user:
        basic = base64.b64encode(f"{user}:{password or ''}".encode()).decode("ascii")
        headers["Authorization"] = f"Basic {basic}"
    elif os.environ.get("MLFLOW_TRACKING_TOKEN"):
        headers["Authorization"] = f"Bearer {os.environ['MLFLOW_TRACKING_TOKEN']}"
    return url, headers


# Servers found unreachable in this process, with why: a sweep's jobs do not each wait on a
# silent server, and once one goes away mid-sweep the remaining jobs go straight to the local
# store. A server that answered is asked again by each connect() (a few ms).
_down: dict[str, str] = {}


def reachable(uri: str, fresh: bool = False) -> str | None:
    """None if an http(s) tracking server answers /health in time, else why not. A server
    found down stays down for this process unless `fresh` (sync: the point is that it's back)."""
    from softmaxlab.core.probe import http_status

    if uri in _down and not fresh:
        return _down[uri]
    url, headers = _health_probe(uri)
    status = http_status(url, REACHABLE_TIMEOUT_S, headers)
    # A string: nothing answered, and why; a number: the server's HTTP status.
    why = (
        redact_text(status, uri) if isinstance(status, str) else (None if status == 200 else f"HTTP {status}")
    )
    if why:
        _down[uri] = why
    else:
        _down.pop(uri, None)
    return why


def is_tracking_error(err: BaseException) -> bool:
    """An error from talking to the tracking store (MLflow's, or the HTTP connection's)."""
    from mlflow.exceptions import MlflowException
    from requests.exceptions import RequestException

    return isinstance(err, MlflowException | RequestException)


def refusal(err: BaseException) -> int | None:
    """401 or 403 when `err` is an MLflow server's refusal of the credentials (the status MLflow
    mapped, or the one its message quotes from the HTTP answer), else None."""
    import re

    from mlflow.exceptions import MlflowException

    if not isinstance(err, MlflowException):
        return None
    code = err.get_http_status_code()
    if code in (401, 403):
        return code
    quoted = re.search(r"\b(401|403)\b", str(err))
    return int(quoted.group(1)) if quoted else None


def credentials_error(err: BaseException, uri: str, experiment: str) -> UserError | None:
    """A tracking server's refusal (HTTP 401 or 403) as one line naming what to set, or None
    for any other error. Never shows the password."""
    from urllib.parse import unquote, urlsplit

    code = refusal(err)
    if code is None:
        return None
    user = os.environ.get("MLFLOW_TRACKING_USERNAME") or unquote(urlsplit(uri).username or "")
    server = f"MLflow server {redact(uri)}"
    if code == 401 and not user:
        return UserError(
            f"{server} wants a login (HTTP 401): set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD "
            "(a team user's, from `softmaxlab team add-user`)"
        )
    if code == 401:
        return UserError(
            f"{server} refused MLFLOW_TRACKING_USERNAME={user} with its password (HTTP 401): "
            "check MLFLOW_TRACKING_PASSWORD"
        )
    return UserError(
        f"{server}: user {user or '(none)'} may not write to experiment {experiment!r} (HTTP 403): "
        f"its owner or an admin grants it (`softmaxlab team grant {user or 'USER'} {experiment} EDIT`), "
        "or choose another tracking.experiment"
    )


def unusable_store(err: BaseException, uri: str) -> UserError:
    """A store that failed on first use (a damaged store, a server error), in one line."""
    from softmaxlab.core.errors import first_line

    return UserError(
        f"MLflow tracking store {redact(uri)} is not usable: {redact_text(first_line(err), uri)}"
    )
