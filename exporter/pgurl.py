"""What libpq would refuse in a `state.url`, found when the config is read instead of retried as an outage."""

from __future__ import annotations

# libpq's sslmode values (https://www.postgresql.org/docs/current/libpq-ssl.html), checked here because libpq
# parses any string and refuses it only when connecting.
SSL_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
# Connection options libpq parses as integers only when it connects.
INTEGER_OPTIONS = ("connect_timeout", "keepalives", "keepalives_idle", "keepalives_interval", "keepalives_count")


def url_problem(url: str) -> str:
    """Why libpq could not connect with this URL whatever the server does, or "" if it could; never quotes the
    URL (it may hold a password). The PostgreSQL driver parses it, as the state backend will."""
    from psycopg import ProgrammingError  # the driver only for configs that name a database
    from psycopg.conninfo import conninfo_to_dict

    try:
        options = conninfo_to_dict(url)
    except ProgrammingError as err:
        # libpq's message quotes the URL: say what it found, not where.
        reason = str(err).strip().splitlines()[0].split(" in URI", 1)[0]
        if url in reason:  # not seen from libpq, but a password must not leave even then
            reason = "invalid URL"
        return f"is not a URL libpq can read: {reason}"
    for port in str(options.get("port") or "").split(","):
        if port and not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
            return f"port {port!r} must be a number from 1 to 65535"
    sslmode = options.get("sslmode")
    if sslmode is not None and sslmode not in SSL_MODES:
        return f"sslmode {sslmode!r} must be one of {', '.join(SSL_MODES)}"
    for name in INTEGER_OPTIONS:
        value = str(options.get(name) or "")
        if value and not (value.isascii() and value.lstrip("-").isdigit()):
            return f"{name} {value!r} must be an integer"
    return ""


def ssl_root_cert(url: str) -> str:
    """The CA file the URL names (`sslrootcert`), or "" (for check_system: it must be readable)."""
    from psycopg.conninfo import conninfo_to_dict

    value = conninfo_to_dict(url).get("sslrootcert")
    return str(value) if value and value != "system" else ""
