"""Settings of the push subsystem (built by the server's config layer, never from os.environ here)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PushSettings:
    """Push configuration; field names are the lower-cased environment variable names."""

    #: Firebase service-account JSON (``project_id``, ``client_email``, ``private_key``, ``token_uri``).
    firebase_cfg_file: str | None = None
    #: FCM HTTP v1 base URL (``{base}/v1/projects/{id}/messages:send``).
    fcm_base_url: str = "https://fcm.googleapis.com"
    #: OAuth2 token endpoint; overrides the service account's ``token_uri`` when set.
    fcm_token_url: str | None = None
    #: APNs JSON ``{keyId, teamId, production}``.
    apns_cfg_file: str | None = None
    #: APNs ``.p8`` EC private key (token-based auth).
    apns_path_key: str | None = None
    #: APNs ``apns-topic`` (the app's bundle id); APNs is disabled without it.
    apns_topic: str | None = None
    #: APNs host; default api.push.apple.com or api.sandbox.push.apple.com by ``production``.
    apns_host: str | None = None
    apns_port: int = 443
    #: PEM bundle trusted for both providers instead of the system roots.
    push_ca_file: str | None = None
    push_title: str = "New message"
    push_body: str = "You have a new message"
    #: Send silent (background) notifications only: no visible alert anywhere.
    notification_data_only: bool = False
    #: At most one push per token per window.
    push_throttle_ms: int = 5000
    #: Pushes in flight at once; more wait in a bounded queue.
    push_concurrency: int = 32
    #: Pushes waiting for a slot; beyond this new pushes are dropped (logged and counted).
    push_queue_size: int = 1000
    #: Attempts per push, first one included (transient errors only are retried).
    push_max_attempts: int = 3
    #: First retry delay; doubled on each further attempt, capped at ``push_backoff_max_ms``.
    push_backoff_ms: int = 1000
    push_backoff_max_ms: int = 60_000
    #: Longest ``Retry-After`` honoured; a longer one ends the push as failed.
    push_max_retry_after_ms: int = 600_000
    #: Timeout of one provider request (connection set-up included).
    push_timeout_ms: int = 10_000
    #: Collapse key / ``apns-collapse-id`` so several pushes show as one; empty to disable.
    push_collapse_key: str = "generic-new-messages"
    #: ``apns-expiration``: how long APNs keeps trying to deliver (seconds from now).
    apns_expiration_s: int = 86_400

    def __post_init__(self) -> None:
        if self.push_concurrency < 1:
            raise ValueError("push_concurrency must be >= 1")
        if self.push_queue_size < 0:
            raise ValueError("push_queue_size must be >= 0")
        if self.push_max_attempts < 1:
            raise ValueError("push_max_attempts must be >= 1")
        if self.push_throttle_ms < 0:
            raise ValueError("push_throttle_ms must be >= 0")
        if self.push_timeout_ms <= 0:
            raise ValueError("push_timeout_ms must be > 0")
        if not 1 <= self.apns_port <= 65535:
            raise ValueError("apns_port must be a TCP port")
