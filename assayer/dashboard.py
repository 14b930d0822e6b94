"""rq-dashboard, configured the safe way: JSON serializer, basic auth, no delete buttons unless allowed."""

from __future__ import annotations

import logging
from typing import Any

from .errors import ConfigError
from .settings import Settings

log = logging.getLogger("assayer.dashboard")


def make_app(settings: Settings) -> Any:
    if not settings.dashboard_password:
        raise ConfigError(
            "the dashboard needs a password",
            "set ASSAYER_DASHBOARD_PASSWORD (or ASSAYER_DASHBOARD_PASSWORD_FILE pointing at a secret file)",
        )
    from rq.serializers import JSONSerializer
    from rq_dashboard import cli as rqd_cli
    from rq_dashboard import web

    app = rqd_cli.make_flask_app(None, settings.dashboard_user, settings.dashboard_password, "")
    app.config["RQ_DASHBOARD_REDIS_URL"] = settings.effective_redis_url
    app.config["RQ_DASHBOARD_DISABLE_DELETE"] = not settings.dashboard_allow_delete
    app.config["DEPRECATED_OPTIONS"] = []
    web.config.serializer = JSONSerializer  # our queues never hold pickles
    web.setup_rq_connection(app)
    return app


def run(settings: Settings) -> None:
    from werkzeug.serving import run_simple

    app = make_app(settings)
    log.info("rq-dashboard on http://%s:%d (user %s)", settings.dashboard_bind, settings.dashboard_port,
             settings.dashboard_user)
    run_simple(settings.dashboard_bind, settings.dashboard_port, app, threaded=True)
