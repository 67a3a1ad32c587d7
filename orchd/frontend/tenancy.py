"""Tenants at the edge: every id a client names is namespaced by its API key here, so the
scheduler, the supervisors and the rings only ever see ids no other key can name.

A client's task ``t-0`` is the task ``<key id>/t-0`` inside orchd (likewise its sessions).
Client ids cannot hold a ``/`` (the body schema and the URL both refuse it), so no key can
spell another key's id: another key's task, stream, cancel or session is simply not found,
a 404 that says nothing of whether the id exists. Artifacts are content-addressed; the
scheduler records which keys put (or, for transcripts, caused) each one and shows it to those
keys only.

Support access: an admin key may add ``?tenant=<key id>`` (the 12 hex digits that logs show as
``api_key_id``) to the stream, cancel, session and artifact routes to act on that key's
tasks; a client key that names another tenant gets 403.
"""

from __future__ import annotations

import re

from starlette.requests import Request

from ipc.protocol import TaskSpec
from orchd.core.errors import Code, OrchdError

SEP = "/"
_KEY_ID = re.compile(r"^[0-9a-f]{12}$")


def is_admin(request: Request) -> bool:
    return bool(request.scope["state"].get("api_key_role") == "admin")


def require_admin(request: Request, what: str) -> None:
    if not is_admin(request):
        raise OrchdError(Code.FORBIDDEN, f"{what} needs an admin API key")


def tenant(request: Request) -> str:
    """The key id whose tasks, sessions and artifacts this request names: the caller's own,
    or for an admin key the one in ``?tenant=``."""
    state = request.scope["state"]
    own: str = state.get("api_key_id", "")
    asked = request.query_params.get("tenant")
    if asked is None or asked == own:
        return own
    require_admin(request, "tenant= (another key's tasks)")
    if not _KEY_ID.match(asked):
        raise OrchdError(Code.INVALID_PARAMS, "tenant: a key id is 12 lowercase hex digits")
    return asked


def scoped(key_id: str, client_id: str) -> str:
    """The id orchd uses inside for a client's ``client_id``."""
    return f"{key_id}{SEP}{client_id}"


def unscoped(internal: str) -> str:
    """The id its client gave (``scoped`` undone)."""
    return internal.partition(SEP)[2] or internal


def scope_spec(spec: TaskSpec, key_id: str) -> None:
    """Namespace a submitted task's ids by the key that submits it."""
    spec.task_id = scoped(key_id, spec.task_id)
    spec.session_id = scoped(key_id, spec.session_id)


def local_error(e: OrchdError, key_id: str) -> OrchdError:
    """An error from inside, its ids as the client spelled them."""
    e.message = e.message.replace(key_id + SEP, "")
    return e
