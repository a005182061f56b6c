"""One HTTP probe for "is it up" questions about servers the project starts on 127.0.0.1: the
team's servers while they start, the UI before its link is printed. (A tracking server the user
configured is asked through MLflow's own client instead: tracking.server.reachable.)"""

from __future__ import annotations

import urllib.error
import urllib.request


def http_status(url: str, timeout: float) -> int | str:
    """The HTTP status a GET of `url` gets (an error status included: a server that says 401 or
    403 is up), or, when nothing answers (refused, reset, DNS, timeout), why, as text."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code
    except Exception as err:  # refused, DNS, timeout: all mean "not reachable now"
        reason = getattr(err, "reason", err)
        return str(reason) or type(err).__name__


def answers_ok(url: str, timeout: float) -> bool:
    """True when `url` answers HTTP 200 within `timeout`."""
    return http_status(url, timeout) == 200
