"""The official `kaggle` client, signed in, and its failures as one-line messages (KaggleError).

`import kaggle` signs in at once (and may create its config folder), so it happens only inside `kaggle_api()`,
when a command actually talks to Kaggle. Everything else in the pipeline calls Kaggle through `call`."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable
from typing import TypeVar

from .errors import PipelineError
from .extras import DISTRIBUTION, require

T = TypeVar("T")

CREDENTIALS_HELP = (
    "no Kaggle credentials: set KAGGLE_API_TOKEN (a token from kaggle.com/settings, API section), or save "
    '~/.kaggle/kaggle.json ({"username": ..., "key": ...}), or set KAGGLE_USERNAME and KAGGLE_KEY'
)


class KaggleError(PipelineError):
    """Kaggle refused or could not be reached; the message says what to do."""


def kaggle_api():
    """The signed-in `kaggle.api.KaggleApi`, or KaggleError when no credentials are found or accepted."""
    require("kaggle", "the Kaggle round trip (data.competition, submit, submissions)")
    with contextlib.redirect_stdout(io.StringIO()):  # the client prints its sign-in help on import
        try:
            from kaggle.api.kaggle_api_extended import KaggleApi
        except ImportError as e:
            raise KaggleError(
                f"the kaggle client cannot be imported ({e}): pip install '{DISTRIBUTION}[kaggle]'"
            ) from None
        api = KaggleApi()
        try:
            api.authenticate()
        except SystemExit:  # the client's own way of saying "no credentials"
            raise KaggleError(CREDENTIALS_HELP) from None
        except Exception as e:  # signing in with a token already talks to Kaggle
            raise explain(e, "sign in") from None
    return api


NOTHING_CHANGED = "nothing was changed"


def call(what: str, fn: Callable[[], T], if_cut: str = NOTHING_CHANGED) -> T:
    """Run one client call; any failure becomes a KaggleError that says what `what` was and why it failed.
    `if_cut`: what the user should know when the connection fails midway (a submission may have arrived)."""
    try:
        return fn()
    except KaggleError:
        raise
    except Exception as e:
        raise explain(e, what, if_cut) from None


def explain(e: Exception, what: str, if_cut: str = NOTHING_CHANGED) -> KaggleError:
    """The one-line message for an exception the client raised during `what`."""
    import requests

    if isinstance(e, (requests.ConnectionError, requests.Timeout)):
        return KaggleError(f"{what}: cannot reach Kaggle (no network, or a proxy in the way); {if_cut}")
    response = getattr(e, "response", None)
    status = getattr(response, "status_code", None)
    text = _server_message(e, response)
    lowered = text.lower()
    if status == 401:
        return KaggleError(f"{what}: Kaggle did not accept the credentials (401). " + CREDENTIALS_HELP[3:])
    if "rules" in lowered:
        return KaggleError(
            f"{what}: the competition's rules are not accepted yet: open the competition's page on kaggle.com, "
            "choose Join Competition / I Understand and Accept, then run this again"
        )
    if "daily" in lowered or "allowance" in lowered:
        return KaggleError(f"{what}: the daily submission limit is reached ({text}); nothing was changed")
    if status == 429:
        return KaggleError(f"{what}: Kaggle is limiting the request rate (429); wait a minute and run it again")
    if status == 404:
        return KaggleError(
            f"{what}: no such competition on Kaggle (404); data.competition takes the slug of the competition's "
            "address, e.g. kaggle.com/competitions/SLUG"
        )
    if status == 403:
        return KaggleError(f"{what}: Kaggle refused it (403: {text})")
    return KaggleError(f"{what}: Kaggle answered {status or type(e).__name__}: {text}")


def _server_message(e: Exception, response) -> str:
    try:
        body = response.json()
        if isinstance(body, dict) and body.get("message"):
            return str(body["message"])
    except Exception:
        pass
    return str(e).splitlines()[0] if str(e) else type(e).__name__
