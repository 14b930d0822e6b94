"""rq-dashboard, configured the safe way: JSON serializer, basic auth, no state change unless allowed, waitress.

rq-dashboard 0.9.0 guards nothing itself: its requeue-all route answers a plain GET, and requeue,
compact, delete and empty answer any POST (its "disable delete" only hides two buttons and makes two
routes no-ops). Behind basic auth that is a cross-site request forgery hole: a browser attaches
cached basic credentials to requests that other sites' pages make, so any page the operator opens
could requeue every failed job. So two hooks of ours run before rq-dashboard sees a request:

1. Basic auth, compared in constant time.
2. The action rule. A request is an *action* when its route accepts anything but GET, HEAD and
   OPTIONS (read from the URL map, so a route a later rq-dashboard adds is covered too) or when its
   own method is not one of those. An action is refused with 403 unless
   ASSAYER_DASHBOARD_ALLOW_ACTIONS is true. When allowed it must be a POST (405 otherwise: a GET
   never changes state) that carries the CSRF token twice: in the ``_csrf_token`` cookie and in the
   ``X-CSRFToken`` header or a ``csrf_token`` form field. Another site can neither read the cookie
   nor send that header, and the token is a nonce signed with a key derived from the dashboard
   password, so a cookie planted from a sibling domain does not verify either (and every replica
   accepts the others' tokens). rq-dashboard's own JavaScript already reads that cookie and sends
   the header with every jQuery request, so its buttons work unchanged once our pages set the cookie.

With actions off, the buttons that could only meet a 403 are hidden by a line of CSS.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from typing import Any

from flask import Response, request

from .errors import ConfigError
from .ports import require_free
from .settings import Settings

log = logging.getLogger("assayer.dashboard")

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
"""Methods that never change state, on routes that accept nothing else."""

CSRF_COOKIE = "_csrf_token"
"""The cookie rq-dashboard's dashboard.js reads at page load..."""

CSRF_HEADER = "X-CSRFToken"
"""...and sends back in this header with every jQuery request."""

CSRF_FIELD = "csrf_token"
"""Form field accepted instead of the header, for a plain HTML form."""

SERVER_THREADS = 8
"""waitress worker threads: page loads plus a few browsers polling every 2.5 s."""

REALM = "Assayer dashboard"

HIDE_ACTION_BUTTONS = (b"<style>#requeue-all-btn,#compact-btn,#requeue-job-btn,[data-role=requeue-job-btn]"
                       b"{display:none!important}</style>")

NAV_ANCHOR = b'<ul class="navbar-nav mr-auto">'
NAV_LINK = b'<li class="nav-item"><a href="/checkpoints/" class="nav-link">Checkpoints</a></li>'
"""rq-dashboard's menu gets a link to Assayer's checkpoint pages (which link back)."""

ACTIONS_OFF = ("dashboard actions are off: requeue, delete, empty, compact, re-evaluate, pause and resume are "
               "refused; set "
               "ASSAYER_DASHBOARD_ALLOW_ACTIONS=true (chart: dashboard.allowActions) to allow them\n")
POST_ONLY = "dashboard actions are POST-only, with the CSRF token: use the dashboard's buttons\n"
BAD_TOKEN = ("dashboard action refused: missing or invalid CSRF token (send the _csrf_token cookie's value "
             "in the X-CSRFToken header); reload the dashboard page and try again\n")


def make_app(settings: Settings) -> Any:
    password = settings.dashboard_password
    if not password:
        raise ConfigError(
            "the dashboard needs a password",
            "set ASSAYER_DASHBOARD_PASSWORD (or ASSAYER_DASHBOARD_PASSWORD_FILE pointing at a secret file)",
        )
    from rq.serializers import JSONSerializer
    from rq_dashboard import cli as rqd_cli
    from rq_dashboard import web

    # No user for rq-dashboard's own basic auth: it compares in plain time and is added to its
    # module-level blueprint, after ours; our guard is the app's first hook.
    app = rqd_cli.make_flask_app(None, None, None, "")
    app.config["RQ_DASHBOARD_REDIS_URL"] = settings.effective_redis_url
    app.config["RQ_DASHBOARD_DISABLE_DELETE"] = not settings.dashboard_allow_actions
    app.config["DEPRECATED_OPTIONS"] = []
    web.config.serializer = JSONSerializer  # our queues never hold pickles
    web.setup_rq_connection(app)
    from .pages import blueprint

    app.config["ASSAYER_CONN"] = settings.redis()
    app.config["ASSAYER_SETTINGS"] = settings
    app.register_blueprint(blueprint)  # before the guard reads the routes: its POST routes are actions too
    guard = Guard(settings.dashboard_user, password, settings.dashboard_allow_actions, action_endpoints(app))
    app.before_request(guard.before)
    app.after_request(guard.after)
    return app


def action_endpoints(app: Any) -> frozenset[str]:
    """Endpoints of every route that accepts a method other than GET, HEAD and OPTIONS."""
    return frozenset(rule.endpoint for rule in app.url_map.iter_rules() if set(rule.methods or ()) - SAFE_METHODS)


class Guard:
    """Basic auth, then the action rule of the module docstring."""

    def __init__(self, user: str, password: str, allow_actions: bool, actions: frozenset[str]) -> None:
        self.user = user
        self.password = password
        self.allow_actions = allow_actions
        self.actions = actions
        self._key = hmac.new(password.encode(), b"assayer dashboard csrf", hashlib.sha256).digest()

    def __repr__(self) -> str:
        return f"Guard(user={self.user!r}, allow_actions={self.allow_actions})"

    def before(self) -> Response | None:
        auth = request.authorization
        if auth is None or auth.type != "basic" or not (_same(auth.username, self.user)
                                                        and _same(auth.password, self.password)):
            return Response("Please log in\n", 401, {"WWW-Authenticate": f'Basic realm="{REALM}"'},
                            mimetype="text/plain")
        if request.endpoint not in self.actions and request.method in SAFE_METHODS:
            return None
        if not self.allow_actions:
            return _refuse(403, ACTIONS_OFF)
        if request.method != "POST":
            return _refuse(405, POST_ONLY, {"Allow": "POST"})
        cookie = request.cookies.get(CSRF_COOKIE, "")
        sent = request.headers.get(CSRF_HEADER) or request.form.get(CSRF_FIELD, "")
        if not (self.valid(cookie) and hmac.compare_digest(cookie.encode(), sent.encode())):
            return _refuse(403, BAD_TOKEN)
        log.info("dashboard action %s by %s", request.path, self.user)
        return None

    def after(self, response: Response) -> Response:
        response.headers["X-Frame-Options"] = "DENY"  # no clicking our buttons through another site's frame
        response.headers["Content-Security-Policy"] = "frame-ancestors 'none'"
        page = response.status_code == 200 and response.mimetype == "text/html" and not response.direct_passthrough
        if not page:
            return response
        response.set_data(response.get_data().replace(NAV_ANCHOR, NAV_ANCHOR + NAV_LINK, 1))  # rq-dashboard's pages
        if not self.allow_actions:
            response.set_data(response.get_data().replace(b"</head>", HIDE_ACTION_BUTTONS + b"</head>", 1))
        elif not self.valid(request.cookies.get(CSRF_COOKIE, "")):
            # Not HttpOnly: dashboard.js reads it. SameSite: never sent on another site's requests.
            response.set_cookie(CSRF_COOKIE, self.new_token(), path="/", samesite="Strict", secure=request.is_secure)
        return response

    def new_token(self) -> str:
        nonce = secrets.token_hex(16)
        return f"{nonce}.{self._sign(nonce)}"

    def valid(self, token: str) -> bool:
        nonce, _, signature = token.partition(".")
        return bool(nonce) and hmac.compare_digest(signature.encode(), self._sign(nonce).encode())

    def _sign(self, nonce: str) -> str:
        return hmac.new(self._key, nonce.encode(), hashlib.sha256).hexdigest()


def _same(given: str | None, expected: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())


def _refuse(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    log.warning("dashboard refused %s %s: %d", request.method, request.path, status)
    return Response(message, status, headers, mimetype="text/plain")


def run(settings: Settings) -> None:
    import waitress

    app = make_app(settings)
    require_free(settings.dashboard_port, settings.dashboard_bind, "rq-dashboard",
                 "stop that process, or set ASSAYER_DASHBOARD_PORT to a free port")
    log.info("rq-dashboard on http://%s:%d (user %s, actions %s), served by waitress", settings.dashboard_bind,
             settings.dashboard_port, settings.dashboard_user, "allowed" if settings.dashboard_allow_actions else "off")
    waitress.serve(app, host=settings.dashboard_bind, port=settings.dashboard_port, threads=SERVER_THREADS,
                   ident="waitress")
