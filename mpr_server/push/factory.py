"""``build_push_service``: load credentials, build the providers, warn about what is disabled."""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IReactorTime

from .apns import PRODUCTION_HOST, SANDBOX_HOST, ApnsSender, load_apns_credentials
from .fcm import FcmSender, load_service_account, make_http_client
from .h2client import H2Client
from .model import CredentialsError
from .service import PushService, Sender
from .settings import PushSettings
from .throttle import Throttle
from .tls import client_tls, https_policy, load_trust_root

_log = PushService._log


def build_push_service(
    settings: PushSettings, reactor: Any, throttle: Throttle, *, clock: IReactorTime | None = None
) -> PushService:
    """A PushService for ``settings``; a provider whose credentials are unusable is disabled with a warning.

    ``reactor`` must provide IReactorTCP and IReactorTime; ``clock`` (default: the reactor)
    times retries only.
    """
    senders: dict[str, Sender | None] = {"fcm": None, "apns": None}
    try:
        trust_root = load_trust_root(settings.push_ca_file)
    except (OSError, ValueError) as e:
        _log.warn(
            "PUSH_CA_FILE {path} is unusable ({error}): push notifications disabled",
            path=settings.push_ca_file,
            error=str(e),
        )
        return PushService(settings, clock or reactor, throttle, senders)

    if not settings.firebase_cfg_file:
        _log.info("FIREBASE_CFG_FILE is not set: FCM push notifications disabled")
    else:
        try:
            account = load_service_account(settings.firebase_cfg_file)
        except CredentialsError as e:
            _log.warn(
                "FIREBASE_CFG_FILE {path}: {error}; FCM push notifications disabled",
                path=settings.firebase_cfg_file,
                error=str(e),
            )
        else:
            http, pool = make_http_client(reactor, https_policy(trust_root), settings.push_concurrency)
            senders["fcm"] = FcmSender(reactor, settings, account, http, pool)
            _log.info("FCM push enabled for project {project}", project=account.project_id)

    if not settings.apns_cfg_file and not settings.apns_path_key:
        _log.info("APNS_CFG_FILE and APNS_PATH_KEY are not set: APNs push notifications disabled")
    elif not settings.apns_cfg_file or not settings.apns_path_key:
        _log.warn("APNS_CFG_FILE or APNS_PATH_KEY is not set: APNs push notifications disabled")
    elif not settings.apns_topic:
        _log.warn("APNS_TOPIC is not set: APNs push notifications disabled")
    else:
        try:
            credentials = load_apns_credentials(settings.apns_cfg_file, settings.apns_path_key)
        except CredentialsError as e:
            _log.warn("APNs credentials unusable: {error}; APNs push notifications disabled", error=str(e))
        else:
            host = settings.apns_host or (PRODUCTION_HOST if credentials.production else SANDBOX_HOST)
            client = H2Client(
                reactor,
                reactor,
                host,
                settings.apns_port,
                client_tls(host, trust_root, [b"h2"]),
                connect_timeout=settings.push_timeout_ms / 1000.0,
            )
            senders["apns"] = ApnsSender(reactor, settings, credentials, client)
            _log.info("APNs push enabled via {host}:{port}", host=host, port=settings.apns_port)

    return PushService(settings, clock or reactor, throttle, senders)
