"""``MONGODB_URI`` read the way MongoDB drivers read it, within what txmongo can do.

* ``mongodb://[user:password@]host[:port][,host[:port]...][/database][?options]`` and
  ``mongodb+srv://`` (which implies ``tls=true``, as in every driver).
* Credentials: SCRAM-SHA-1 (``authMechanism`` unset, ``DEFAULT`` or ``SCRAM-SHA-1``), with
  ``authSource``. txmongo only authenticates when the URI names a database, so a URI with
  credentials and no path is rewritten to use ``/MessagePickupRepository`` with
  ``authSource=admin`` (unless given), which is what drivers do. Other mechanisms are refused.
* ``replicaSet``: txmongo finds the primary among the listed hosts and those the servers report.
* TLS options are checked here and applied by ``tls.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qs, unquote, urlsplit, urlunsplit

DEFAULT_DB = "MessagePickupRepository"


class MongoConfigError(ValueError):
    pass


# ---------------------------------------------------------------------------
# MONGODB_URI

_TLS_OPTIONS = {
    "tls",
    "ssl",
    "tlscafile",
    "tlscertificatekeyfile",
    "tlscertificatekeyfilepassword",
    "tlsallowinvalidcertificates",
    "tlsallowinvalidhostnames",
    "tlsinsecure",
    # no revocation checks are made at all, so turning them off changes nothing
    "tlsdisableocspendpointcheck",
    "tlsdisablecertificaterevocationcheck",
}
_SCRAM_SHA_1 = ("DEFAULT", "SCRAM-SHA-1")


@dataclass(frozen=True)
class MongoTLS:
    """What the URI asks of TLS. Verification is on unless explicitly turned off."""

    ca_file: str | None = None
    certificate_key_file: str | None = None
    certificate_key_password: str | None = None
    allow_invalid_certificates: bool = False
    allow_invalid_hostnames: bool = False


@dataclass(frozen=True)
class MongoSettings:
    uri: str
    """The URI handed to txmongo (credentials without a path get the default database)."""
    hosts: str
    database: str
    username: str | None
    auth_source: str | None
    replica_set: str | None
    tls: MongoTLS | None


def _flag(options: dict[str, str], name: str) -> bool | None:
    value = options.get(name)
    if value is None:
        return None
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise MongoConfigError(f"MONGODB_URI option {name} must be true or false, not {value!r}")


def _tls_settings(scheme: str, options: dict[str, str]) -> MongoTLS | None:
    unsupported = sorted(k for k in options if k.startswith(("tls", "ssl")) and k not in _TLS_OPTIONS)
    if unsupported:
        raise MongoConfigError(f"MONGODB_URI TLS options not supported: {', '.join(unsupported)}")
    tls, ssl = _flag(options, "tls"), _flag(options, "ssl")
    if tls is not None and ssl is not None and tls != ssl:
        raise MongoConfigError("MONGODB_URI has conflicting tls and ssl options")
    explicit = tls if tls is not None else ssl
    tuning = sorted(k for k in options if k in _TLS_OPTIONS and k not in ("tls", "ssl"))
    if explicit is False:
        if tuning:
            raise MongoConfigError(f"MONGODB_URI has tls=false but also {', '.join(tuning)}")
        return None
    if not (explicit or tuning or scheme == "mongodb+srv"):
        return None
    insecure = bool(_flag(options, "tlsinsecure"))
    for name in ("tlsdisableocspendpointcheck", "tlsdisablecertificaterevocationcheck"):
        _flag(options, name)
    return MongoTLS(
        ca_file=options.get("tlscafile") or None,
        certificate_key_file=options.get("tlscertificatekeyfile") or None,
        certificate_key_password=options.get("tlscertificatekeyfilepassword"),
        allow_invalid_certificates=insecure or bool(_flag(options, "tlsallowinvalidcertificates")),
        allow_invalid_hostnames=insecure or bool(_flag(options, "tlsallowinvalidhostnames")),
    )


def parse_mongodb_uri(uri: str) -> MongoSettings:
    """Check MONGODB_URI and work out what txmongo must be given. Raises MongoConfigError."""
    parts = urlsplit(uri)
    if parts.scheme not in ("mongodb", "mongodb+srv"):
        raise MongoConfigError("MONGODB_URI must start with mongodb:// or mongodb+srv://")
    try:
        raw = parse_qs(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    except ValueError as e:
        raise MongoConfigError(f"MONGODB_URI has malformed options: {e}") from None
    options = {k.lower(): v[-1] for k, v in raw.items()}
    tls = _tls_settings(parts.scheme, options)

    db = unquote(parts.path.lstrip("/"))
    username = unquote(parts.username) if parts.username is not None else None
    auth_source = options.get("authsource")
    query = parts.query
    mechanism = options.get("authmechanism", "DEFAULT").upper()
    if username is not None:
        if mechanism == "SCRAM-SHA-256":
            raise MongoConfigError(
                "MONGODB_URI asks for authMechanism=SCRAM-SHA-256, which the MongoDB client used here (txmongo) "
                "cannot do; use SCRAM-SHA-1 (users have SHA-1 credentials unless created with "
                "mechanisms: ['SCRAM-SHA-256'] only)"
            )
        if mechanism not in _SCRAM_SHA_1:
            raise MongoConfigError(
                f"MONGODB_URI authMechanism={options['authmechanism']} is not supported; only SCRAM-SHA-1 is"
            )
        if not parts.password:
            raise MongoConfigError("MONGODB_URI has a user name but no password")
        if not db:
            # txmongo authenticates only when the URI names a database; drivers authenticate
            # against authSource, else the path's database, else admin.
            if auth_source is None:
                auth_source = "admin"
                query = f"{query}&authSource=admin" if query else "authSource=admin"
            db = DEFAULT_DB
            uri = urlunsplit((parts.scheme, parts.netloc, "/" + DEFAULT_DB, query, parts.fragment))
        auth_source = auth_source or db
    elif "authmechanism" in options and mechanism not in _SCRAM_SHA_1:
        raise MongoConfigError(f"MONGODB_URI authMechanism={options['authmechanism']} is not supported")

    if parts.scheme == "mongodb":  # +srv would resolve DNS here: left to start()
        _validate_with_pymongo(uri)
    return MongoSettings(
        uri=uri,
        hosts=parts.netloc.rpartition("@")[2],
        database=db or DEFAULT_DB,
        username=username,
        auth_source=auth_source,
        replica_set=options.get("replicaset"),
        tls=tls,
    )


def _validate_with_pymongo(uri: str) -> None:
    from pymongo.errors import PyMongoError
    from pymongo.uri_parser import parse_uri

    try:
        parse_uri(uri, validate=True, warn=False)
    except OSError as e:  # it opens tlsCAFile and tlsCertificateKeyFile
        raise MongoConfigError(f"MONGODB_URI names a file that cannot be read: {e.filename}: {e.strerror}") from None
    except (PyMongoError, ValueError, TypeError) as e:
        raise MongoConfigError(f"MONGODB_URI is invalid: {e}") from None


def database_of(uri: str) -> str:
    """The database the cold store uses: the URI's path, else ``MessagePickupRepository``."""
    return parse_mongodb_uri(uri).database
