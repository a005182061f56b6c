"""The tracking server as a client sees it: its URI without credentials, whether it answers,
and its errors read as what they mean (unreachable, credentials refused, a store error)."""

from __future__ import annotations

import os
import re

from softmaxlab.core.errors import UserError, first_line

# How long a remote tracking server may take to answer /health before we fall back (tracker.connect).
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


# A password in a URI's user info (scheme://user:password@host), anywhere in a text: a command
# line's overrides, a configured URI. A user name alone is an identity, not a secret.
_PASSWORD_IN_URI = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)[^/?#@\s:]*:[^/?#@\s]*@")
# Where each configured value takes its secret from instead (the hint of the refusal).
_CREDENTIALS_FROM = {
    "tracking.uri": "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN)",
    "hydra.sweeper.storage": "set SOFTMAXLAB_OPTUNA_STORAGE, which conf/sweep/optuna.yaml reads",
}


def password_refusal(key: str, value: str) -> UserError | None:
    """A password inside a configured value (a Hydra override, params.yaml, conf/): refused,
    since Hydra and DVC record the config and the command line (outputs' .hydra/, the run's
    params, its `overrides` tag and name, the sweep's `sweep_overrides`), which would keep it in
    clear. None when `value` holds none. The secret's place is the environment."""
    if not _PASSWORD_IN_URI.search(value):
        return None
    shown = _PASSWORD_IN_URI.sub(r"\1***@", value)
    where = _CREDENTIALS_FROM.get(key.lstrip("+~"), "pass the secret in the environment")
    return UserError(
        f"{key}={shown} holds a password, which the run's config and records would keep in clear: "
        f"give the URI without it and {where}"
    )


# Servers found unreachable in this process, with why: a sweep's jobs do not each wait on a
# silent server, and once one goes away mid-sweep the remaining jobs go straight to the local
# store. A server that answered is asked again by each connect() (a few ms).
_down: dict[str, str] = {}


def reachable(uri: str, fresh: bool = False) -> str | None:
    """None if an http(s) tracking server answers /health in time, else why not. A server
    found down stays down for this process unless `fresh` (sync: the point is that it's back).

    A refused login is no outage: a login in front of the server (an authenticating proxy)
    answers /health itself with 401 or 403, and falling back would keep the runs from the
    team for good. That, and a TLS failure, raise the one-line UserError instead."""
    if uri in _down and not fresh:
        return _down[uri]
    why = _health(uri)
    if why:
        _down[uri] = why
    else:
        _down.pop(uri, None)
    return why


def _health(uri: str) -> str | None:
    """GET <uri>/health as MLflow's client would send it: MLflow's request helper with the
    credentials (URI user info, MLFLOW_TRACKING_USERNAME/PASSWORD or TOKEN, ~/.mlflow/credentials)
    and TLS settings (MLFLOW_TRACKING_INSECURE_TLS, MLFLOW_TRACKING_SERVER_CERT_PATH,
    MLFLOW_TRACKING_CLIENT_CERT_PATH) MLflow resolves. One try, with its own short timeout:
    MLflow's retries would wait minutes on a server that never answers."""
    from mlflow.exceptions import MlflowException
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request
    from requests.exceptions import SSLError, Timeout

    try:
        response = http_request(
            get_default_host_creds(uri), "/health", "GET", max_retries=0, backoff_factor=0,
            timeout=REACHABLE_TIMEOUT_S, raise_on_status=False,
        )  # fmt: skip
    except MlflowException as err:
        cause = err.__cause__ or err.__context__ or err  # MLflow wraps the requests error
        if isinstance(cause, SSLError):
            raise _tls_error(cause, uri) from None
        if isinstance(cause, Timeout):
            return f"no answer within {REACHABLE_TIMEOUT_S:g} s"
        errno = re.search(r"\[Errno -?\d+\] [^'\")]+", str(cause))  # refused, DNS, unreachable
        return errno.group(0) if errno else redact_text(first_line(cause), uri)
    if response.status_code in (401, 403):
        raise login_refused(response.status_code, uri)
    return None if response.status_code == 200 else f"HTTP {response.status_code}"


def _tls_error(err: BaseException, uri: str) -> UserError:
    """A TLS handshake that failed (an unknown CA, a wrong host name, a client certificate
    wanted): a setting to fix, not an outage to wait out."""
    detail = re.search(r"certificate verify failed[^'\"()]*", str(err))
    why = detail.group(0).strip() if detail else redact_text(first_line(err), uri)
    return UserError(
        f"MLflow server {redact(uri)}: TLS failed ({why}): set MLFLOW_TRACKING_SERVER_CERT_PATH to the CA "
        "bundle that signed its certificate (MLFLOW_TRACKING_CLIENT_CERT_PATH if it asks for yours)"
    )


def is_tracking_error(err: BaseException) -> bool:
    """An error from talking to the tracking store (MLflow's, or the HTTP connection's)."""
    from mlflow.exceptions import MlflowException
    from requests.exceptions import RequestException

    return isinstance(err, MlflowException | RequestException)


def refusal(err: BaseException) -> int | None:
    """401 or 403 when `err` is an MLflow server's refusal of the credentials (the status MLflow
    mapped, or the one its message quotes from the HTTP answer), else None."""
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
    code = refusal(err)
    return None if code is None else login_refused(code, uri, experiment)


def login_refused(code: int, uri: str, experiment: str | None = None) -> UserError:
    """HTTP 401 or 403 from the server at `uri` in one line naming what to set: for a request
    in `experiment`, or (None) at the door, before any experiment (a login in front of it)."""
    user = login_user(uri)
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
    if experiment is None:
        return UserError(
            f"{server} refused user {user or '(none)'} (HTTP 403): check MLFLOW_TRACKING_USERNAME and "
            "MLFLOW_TRACKING_PASSWORD, or ask the server's admin for access"
        )
    return UserError(
        f"{server}: user {user or '(none)'} may not write to experiment {experiment!r} (HTTP 403): "
        f"its owner or an admin grants it (`softmaxlab team grant {user or 'USER'} {experiment} EDIT`), "
        "or choose another tracking.experiment"
    )


def login_user(uri: str) -> str:
    """Who the client logs in as: MLFLOW_TRACKING_USERNAME, or the URI's user ("" if none)."""
    from urllib.parse import unquote, urlsplit

    return os.environ.get("MLFLOW_TRACKING_USERNAME") or unquote(urlsplit(uri).username or "")


def registry_refusal(err: BaseException, uri: str, model: str) -> UserError | None:
    """The server's refusal to add a version to registered model `model` in one line (HTTP 403:
    on a server with logins the model belongs to whoever registered it first), or None."""
    code = refusal(err)
    if code != 403:
        return None if code is None else login_refused(code, uri)
    user = login_user(uri) or "(none)"
    return UserError(
        f"MLflow server {redact(uri)}: user {user} may not add a version to registered model {model!r} "
        "(HTTP 403): its owner or an admin grants it EDIT on the model, or choose another "
        "tracking.registered_model"
    )


def unusable_store(err: BaseException, uri: str) -> UserError:
    """A store that failed on first use (a damaged store, a server error), in one line."""
    return UserError(
        f"MLflow tracking store {redact(uri)} is not usable: {redact_text(first_line(err), uri)}"
    )
