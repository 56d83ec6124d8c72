"""Create the Postgres database the settings name, before anything connects.

With Django's connection pool a missing database or a stopped server shows up
as "couldn't get a connection after 3.00 sec" with the cause only in log
warnings; quickstart and the benchmarks check first and say what is wrong.
"""

from dataclasses import dataclass


class DatabaseUnreachable(Exception):
    """The server could not be reached, or refused the maintenance login."""


@dataclass(frozen=True)
class Target:
    name: str
    user: str = ""
    password: str = ""
    host: str = ""
    port: str | int = ""

    @classmethod
    def from_settings(cls, db: dict) -> "Target":
        return cls(db["NAME"], db.get("USER") or "", db.get("PASSWORD") or "", db.get("HOST") or "", db.get("PORT") or "")

    @classmethod
    def from_url(cls, url: str) -> "Target":
        import environ

        return cls.from_settings(environ.Env.db_url_config(url))

    def where(self) -> str:
        return f"{self.host or 'localhost'}:{self.port or 5432}"


def ensure_postgres_database(target: Target) -> bool:
    """Create the database if it does not exist; True if it was created."""
    import psycopg
    from psycopg import sql

    if not target.name:
        raise DatabaseUnreachable("The database URL names no database.")
    params = dict(
        user=target.user or None, password=target.password or None, host=target.host or None,
        port=target.port or None, connect_timeout=5, autocommit=True,
    )
    try:
        with psycopg.connect(dbname="postgres", **params) as conn:
            if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (target.name,)).fetchone():
                return False
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(target.name)))
            return True
    except psycopg.OperationalError as exc:
        first_line = str(exc).strip().splitlines()[0].strip() if str(exc).strip() else type(exc).__name__
        raise DatabaseUnreachable(
            f"PostgreSQL at {target.where()} cannot be reached as user '{target.user or 'the current user'}' "
            f"({first_line}). Start it, fix DATABASE_URL, or unset DATABASE_URL to run on the embedded SQLite."
        ) from exc
