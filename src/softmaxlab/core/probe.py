"""One HTTP probe for every "is it up" question: the tracking server's /health, the team's
servers while they start, the UI before its link is printed."""

from __future__ import annotations

import urllib.error
import urllib.request


def http_status(url: str, timeout: float, headers: dict[str, str] | None = None) -> int | str:
    """The HTTP status a GET of `url` gets (an error status included: a server that says 401 or
    403 is up), or, when nothing answers (refused, reset, DNS, timeout), why, as text."""
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code
    except Exception as err:  # refused, DNS, timeout: all mean "not reachable now"
        reason = getattr(err, "reason", err)
        return str(reason) or type(err).__name__


def answers_ok(url: str, timeout: float) -> bool:
    """True when `url` answers HTTP 200 within `timeout`."""
    return http_status(url, timeout) == 200
