"""`hearth db provision-roles`: one PostgreSQL login per service (docs/operations.md,
"Database roles").

Until session 28 the four services shared one login, so a compromised clustering process
could read or rewrite privacy's audit log, deletion jobs and wrapped data keys, and every
other service's tables (docs/security.md, attack27 item 3). Each service already lives in
its own schema ``hearth_<service>``; this makes the schema's owner a role of that service
alone:

* the role (the user named in the service's DSN) exists, may log in, is no superuser and
  creates no role or database; its password is the one in that DSN (so each service's
  Secret holds the only copy: one Secret per service), ``search_path`` pinned to its schema;
* it owns its schema and everything in it (an existing schema of the single-login layout
  is handed over with every table and sequence: the upgrade path), migrations run under it;
* nobody else has rights on the schema (PUBLIC's and the other services' are revoked);
* PUBLIC loses what PostgreSQL grants it by default on the database (CONNECT, TEMPORARY)
  and CREATE on ``public`` (which PostgreSQL 15 no longer grants; older clusters upgraded
  in place still do), and EXECUTE on the functions that create large objects (in no
  schema: attack29); each role gets CONNECT;
* each role may run the erasure purge's ``pg_switch_wal(); CHECKPOINT``
  (``pg_checkpoint``, docs/privacy.md §11);
* each role's own defaults (``ALTER ROLE … SET``, role-wide and per database, which a
  login may set on itself: ``statement_timeout = 1`` failed its service's every start) are
  reset (``RESET ALL``) and reported (``settings_reset``); only ``search_path`` is set;
* each role has a ``CONNECTION LIMIT`` (``default_connection_limit``), so a compromised
  service cannot take every one of the server's ``max_connections`` from the others;
* no role is a member of a service role but the ``--keep-access-for`` login of this run
  (an upgrade's old login): a membership an earlier run granted, or one granted by hand,
  is revoked and reported (``revoked_access_for``; until session 29 they stayed for good)
  — except the admin's, a superuser's or CREATEROLE login's and one WITH ADMIN OPTION,
  which could be granted back at will (``members_left``);

All in one transaction under a bounded ``lock_timeout`` (``--lock-timeout``): handing a
table over takes an ACCESS EXCLUSIVE lock, which a running service's open transaction on
it holds off; until session 29 the command then waited for good, and every query on that
table queued behind it. Now it stops, rolls back (nothing changed), names the sessions
holding locks on the services' tables and exits non-zero (``ProvisioningLockTimeout``).

Idempotent: run it at every install and upgrade (the chart's hook Job does).
``hearth restore`` re-applies it with ``as_provisioned``: ownership and rights again, each
role's connection limit and members left as the last run set them. The admin DSN is used
only here: a superuser's, or a managed PostgreSQL's admin login (RDS/Aurora, Cloud SQL,
Azure: ``CREATEROLE``, owner of the database, no superuser; session 31). Such an admin
becomes a member of each service role (owning or handing over a schema for a role needs
it) and cannot do what only a superuser may, which each service's ``not_done`` names:
state NOSUPERUSER NOREPLICATION NOBYPASSRLS (read instead: a role holding one is
refused), revoke PUBLIC's large-object functions (``large_objects`` counts what each
role owns instead), reset a setting only a superuser may set, grant EXECUTE on
``pg_switch_wal()`` and, on 16 without ADMIN OPTION on it, ``pg_checkpoint`` (the
erasure purge's receipts then say ``complete: false``). An admin without CREATEROLE or
the database is refused before anything is done, naming what it lacks.

    HEARTH_POSTGRES_ADMIN_DSN=postgresql://postgres:...@db/hearth \\
    HEARTH_POSTGRES_DSN_CLUSTERING=postgresql://hearth_clustering:...@db/hearth \\
    ... (ATTRIBUTION, PRIVACY, FEEDBACK) hearth db provision-roles
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Mapping

from services.common.storage.dsn import parse_dsn

SERVICES = ("clustering", "attribution", "privacy", "feedback")
# The functions that create a large object, which PUBLIC may execute by default.
LARGE_OBJECT_CREATORS = ("lo_create(oid)", "lo_creat(integer)", "lo_from_bytea(oid, bytea)")
ADMIN_DSN_VARIABLE = "HEARTH_POSTGRES_ADMIN_DSN"
POOL_MAX_VARIABLE = "HEARTH_POSTGRES_POOL_MAX"     # the services' pool size (config.py)
DEFAULT_POOL_MAX = 8                               # config.py's postgres_pool_max
# Pods of one service that may be connected at once: the chart's largest maxReplicas
# (values-production.yaml: clustering, 12) and a rolling update's surge beside them.
REPLICA_ALLOWANCE = 16
# Beyond the pools: a starting pod's schema check (sql.py, before its pool opens) and
# `hearth backup`'s dump of the schema, which use the service's login too.
SPARE_CONNECTIONS = 2
# How long one statement waits for a lock (a service's transaction on a table handed over)
# before the whole provisioning is rolled back: long enough for a service's ordinary
# transactions to end, short enough that the queries queued behind its ACCESS EXCLUSIVE
# request are not stalled for long.
DEFAULT_LOCK_TIMEOUT_S = 10.0
# PostgreSQL's lock_timeout is an int of milliseconds: a longer wait (or inf / nan) failed
# with a traceback after connecting (review30).
MAX_LOCK_TIMEOUT_S = 2_147_483
ADVISORY_LOCK = 7262782    # one provisioning at a time (pg_advisory_xact_lock)


class ProvisioningLockTimeout(ValueError):
    """A lock the provisioning needed was not granted within its lock_timeout; rolled back."""


def default_connection_limit(environ: Mapping[str, str] | None = None) -> int:
    """Each service role's CONNECTION LIMIT unless ``--connection-limit`` says: the
    services' pool size (HEARTH_POSTGRES_POOL_MAX, as they read it; 8 unset) × the
    replica allowance, plus the spare (8 → 130, the production values' 6 → 98)."""
    env = os.environ if environ is None else environ
    raw = env.get(POOL_MAX_VARIABLE, "")
    try:
        pool = int(raw) if raw else DEFAULT_POOL_MAX
    except ValueError:
        raise ValueError(f"{POOL_MAX_VARIABLE}: not an integer ({raw!r})") from None
    if pool < 1:
        raise ValueError(f"{POOL_MAX_VARIABLE}: must be at least 1 (got {pool})")
    return pool * REPLICA_ALLOWANCE + SPARE_CONNECTIONS


def service_dsn_variable(service: str) -> str:
    """The variable holding ``service``'s own DSN for the tools that act for several
    services (provisioning, backups); a service itself reads HEARTH_POSTGRES_DSN."""
    return f"HEARTH_POSTGRES_DSN_{service.upper()}"


def schema_of(service: str) -> str:
    return f"hearth_{service}"


def _login(service: str, dsn: str) -> tuple[str, str | None]:
    parts = parse_dsn(dsn, service_dsn_variable(service))
    user = parts.get("user")
    if not user:
        raise ValueError(f"{service_dsn_variable(service)}: names no user (the service's own role)")
    return str(user), (str(parts["password"]) if parts.get("password") else None)


def login_of(dsn: str, variable: str) -> str:
    """The login a DSN connects as (libpq's default: PGUSER, else the OS user's name)."""
    import getpass

    return str(parse_dsn(dsn, variable).get("user") or os.environ.get("PGUSER") or getpass.getuser())


def _database_of(dsn: str, user: str, variable: str) -> str:
    """The database a DSN connects to (libpq's default: PGDATABASE, else the user's name)."""
    return str(parse_dsn(dsn, variable).get("dbname") or os.environ.get("PGDATABASE") or user)


def server_of(dsn: str, variable: str) -> str:
    """The server a DSN names, as written (libpq's defaults: PGHOST, else the local socket;
    PGPORT, else 5432): ``host[/hostaddr]:port``."""
    parts = parse_dsn(dsn, variable)
    host = parts.get("host") or os.environ.get("PGHOST") or "the local socket"
    hostaddr = parts.get("hostaddr") or os.environ.get("PGHOSTADDR")
    port = parts.get("port") or os.environ.get("PGPORT") or "5432"
    return f"{host}{'/' + hostaddr if hostaddr else ''}:{port}"


def provision_roles(admin_dsn: str, dsns: Mapping[str, str], keep_access_for: str = "",
                    connection_limit: int | None = None, lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S,
                    as_provisioned: bool = False) -> dict[str, dict]:
    """Make each service of ``dsns`` (service -> its DSN) the sole owner of its schema
    under the role its DSN names (module docstring). Returns what was done per service.
    ``connection_limit``: each role's CONNECTION LIMIT (None: ``default_connection_limit()``;
    -1: none, PostgreSQL's default).
    ``keep_access_for``: the single-login layout's login, made a member of every service
    role in the same transaction, so its pods keep working until the rollout replaces
    them (the upgrade, docs/operations.md); every other member of a service role (but the
    admin) is revoked, so a run without it takes back what an earlier run granted.
    ``lock_timeout_s``: each statement's lock wait; past it ``ProvisioningLockTimeout``
    and nothing changed.
    ``as_provisioned`` (``hearth restore``): ownership and rights re-asserted, but an
    existing role keeps its CONNECTION LIMIT and its members (``connection_limit`` and
    ``keep_access_for`` then apply to nothing already there)."""
    import psycopg
    from psycopg import sql

    if connection_limit is None:
        connection_limit = default_connection_limit()
    if not 0 < lock_timeout_s <= MAX_LOCK_TIMEOUT_S:
        raise ValueError(f"--lock-timeout {lock_timeout_s:g}: must be more than 0 and at most "
                         f"{MAX_LOCK_TIMEOUT_S} seconds (PostgreSQL's lock_timeout)")
    if connection_limit == 0 or connection_limit < -1:
        raise ValueError(f"--connection-limit {connection_limit}: at least 1 (each service's pool needs its "
                         "connections), or -1 for no limit")
    logins = {service: _login(service, dsn) for service, dsn in dsns.items()}
    unknown = sorted(set(dsns) - set(SERVICES))
    if unknown:
        raise ValueError(f"unknown service(s) {unknown}: expected some of {list(SERVICES)}")
    by_role: dict[str, list[str]] = {}
    for service, (role, _) in logins.items():
        by_role.setdefault(role, []).append(service)
    shared = {role: services for role, services in by_role.items() if len(services) > 1}
    if shared:
        role, services = next(iter(shared.items()))
        raise ValueError(f"{', '.join(service_dsn_variable(s) for s in services)} all name the role {role}: "
                         "each service needs a login of its own")
    report: dict[str, dict] = {}
    try:
        conn = psycopg.connect(admin_dsn, autocommit=True)
    except psycopg.Error as exc:   # its message names host and port, never the password
        raise ValueError(f"{ADMIN_DSN_VARIABLE}: {str(exc).strip()}") from None
    with conn:
        admin = conn.execute("SELECT current_user").fetchone()[0]
        if keep_access_for in by_role:
            raise ValueError(f"--keep-access-for {keep_access_for}: that is a service's own role")
        if keep_access_for and not conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s",
                                                (keep_access_for,)).fetchone():
            raise ValueError(f"--keep-access-for {keep_access_for}: no such role (the login the services "
                             "shared until now)")
        if admin in by_role:
            raise ValueError(f"{ADMIN_DSN_VARIABLE} and {service_dsn_variable(by_role[admin][0])} are the same role "
                             f"{admin}: the admin login is for provisioning only")
        database = conn.execute("SELECT current_database()").fetchone()[0]
        superuser = _check_admin(conn, admin, database)
        admin_server = server_of(admin_dsn, ADMIN_DSN_VARIABLE)
        for service, (role, _) in sorted(logins.items()):
            # Roles, grants, schemas are made on the admin DSN's server: a service whose DSN
            # names another (privacy's database on another node) got its role and schema
            # here and none there, reported done, and stopped at start (session 30's drill).
            if (server := server_of(dsns[service], service_dsn_variable(service))) != admin_server:
                raise ValueError(f"{service_dsn_variable(service)}: names server {server}, {ADMIN_DSN_VARIABLE} "
                                 f"{admin_server}: a run provisions the admin DSN's server only. A service on "
                                 "another server is provisioned by a run of its own, with that server's admin DSN: "
                                 f"`hearth db provision-roles --service {service}` (the same server under two "
                                 "names: write one in both); nothing was changed")
            # Grants, schemas and PUBLIC's revoked CONNECT are the admin's database's: a
            # service connecting to another would find none of it (and stop at start).
            if (theirs := _database_of(dsns[service], role, service_dsn_variable(service))) != database:
                raise ValueError(f"{service_dsn_variable(service)}: names database {theirs}, {ADMIN_DSN_VARIABLE} "
                                 f"database {database}: both must name the services' database")
        roles = [role for role, _ in logins.values()]
        try:
            with conn.transaction():
                # Every lock wait bounded, this transaction's only (SET LOCAL).
                conn.execute(sql.SQL("SET LOCAL lock_timeout = {}").format(
                    sql.Literal(f"{max(1, round(lock_timeout_s * 1000))}ms")))
                # Replicas of this Job (or two helm upgrades) one at a time.
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (ADVISORY_LOCK,))
                conn.execute(sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(sql.Identifier(database)))
                conn.execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC")
                _public_schema_closed(conn)
                # Large objects are the database's, in no schema: a service's login could
                # store data outside its schema, its dumps and a restore's reach (attack29).
                # Hearth uses none. Only a superuser may revoke PUBLIC's EXECUTE (the
                # functions are the bootstrap superuser's; anyone else's REVOKE only warns).
                if superuser:
                    conn.execute(f"REVOKE EXECUTE ON FUNCTION {', '.join(LARGE_OBJECT_CREATORS)} FROM PUBLIC")
                public_lo = _public_may_create_large_objects(conn)
                for service, (role, password) in sorted(logins.items()):
                    report[service] = _provision_one(conn, database, service, role, password,
                                                     others=[r for r in roles if r != role],
                                                     connection_limit=connection_limit,
                                                     as_provisioned=as_provisioned, superuser=superuser)
                    report[service]["large_objects"] = _large_objects_of(conn, role, public_lo)
                    if not as_provisioned:
                        report[service].update(_converge_members(conn, role, keep_access_for, admin))
        except psycopg.errors.LockNotAvailable:
            raise ProvisioningLockTimeout(_lock_timeout_message(conn, lock_timeout_s)) from None
        except psycopg.errors.InsufficientPrivilege as exc:
            # What the checks above did not foresee (a managed server's own restrictions):
            # the server's words, not a traceback; the transaction is rolled back.
            raise ValueError(f"{ADMIN_DSN_VARIABLE}: role {admin} may not do what provisioning needs: "
                             f"{exc.diag.message_primary}{'. ' + exc.diag.message_detail if exc.diag.message_detail else ''}; "
                             "nothing was changed") from None
    return report


def _check_admin(conn, admin: str, database: str) -> bool:
    """Whether the admin is a superuser; refuses (nothing done) an admin that is none and
    lacks what the managed-server path needs, naming each missing piece. A managed
    PostgreSQL's admin (RDS/Aurora's ``rds_superuser``, Cloud SQL's
    ``cloudsqlsuperuser``, Azure's ``azure_pg_admin``) is a CREATEROLE login that owns
    the database it made: enough for everything but what only a superuser may do, which
    the run reports per service instead (``_provision_one``: ``not_done``)."""
    superuser, createrole, owns = conn.execute(
        "SELECT r.rolsuper, r.rolcreaterole, pg_has_role(current_user, d.datdba, 'USAGE') "
        "FROM pg_roles r, pg_database d WHERE r.rolname = current_user AND d.datname = current_database()"
    ).fetchone()
    if superuser:
        return True
    missing = []
    if not createrole:
        missing.append("CREATEROLE (it creates each service's login and sets its password, connection limit and "
                       "settings; a managed server's admin login has it)")
    if not owns:
        # REVOKE ALL ON DATABASE … FROM PUBLIC and GRANT CONNECT by another login only warn.
        owner = conn.execute("SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = current_database()"
                             ).fetchone()[0]
        missing.append(f"ownership of database {database} (owned by {owner}: it revokes PUBLIC's CONNECT and "
                       f"grants each service's; ALTER DATABASE {database} OWNER TO {admin}, or create it as "
                       f"{admin})")
    if missing:
        raise ValueError(f"{ADMIN_DSN_VARIABLE}: role {admin} is no superuser and lacks {'; and '.join(missing)}; "
                         "nothing was changed. A superuser's DSN, or a managed server's admin login (CREATEROLE, "
                         "owner of the database), is needed")
    return False


def _public_schema_closed(conn) -> None:
    """PUBLIC may not CREATE in schema ``public`` (REVOKEd just before): read back, since a
    REVOKE by a login that does not own the schema only warns — an admin that is no
    superuser on a cluster upgraded from before 15, whose ``public`` is the bootstrap
    superuser's, could not."""
    if conn.execute("SELECT has_schema_privilege('public', 'public', 'CREATE') "
                    "FROM pg_namespace WHERE nspname = 'public'").fetchone() in ((True,),):
        owner = conn.execute("SELECT pg_get_userbyid(nspowner) FROM pg_namespace WHERE nspname = 'public'"
                             ).fetchone()[0]
        raise ValueError(f"PUBLIC may still CREATE in schema public (owned by {owner}), and this admin may not "
                         f"revoke it: as {owner}, REVOKE CREATE ON SCHEMA public FROM PUBLIC, then run this again; "
                         "nothing was changed")


def _public_may_create_large_objects(conn) -> bool:
    return conn.execute(
        "SELECT bool_or(has_function_privilege('public', p.oid, 'EXECUTE')) FROM pg_proc p "
        "WHERE p.oid = ANY(%s::regprocedure[])", (list(LARGE_OBJECT_CREATORS),)).fetchone()[0]


def _large_objects_of(conn, role: str, public_may_create: bool) -> dict:
    """What the report says of large objects for ``role``: how many it owns (Hearth makes
    none: any is a misused or compromised login's, out of its schema, its dumps and an
    erasure's reach) and whether PUBLIC may still create them (an admin that is no
    superuser cannot revoke that: the count is then what watches it)."""
    owned = conn.execute("SELECT count(*) FROM pg_largeobject_metadata WHERE lomowner = "
                         "(SELECT oid FROM pg_roles WHERE rolname = %s)", (role,)).fetchone()[0]
    return {"owned": owned, "creatable": public_may_create}


def _converge_members(conn, role: str, keep_access_for: str, admin: str) -> dict:
    """Make ``keep_access_for`` (if any) the only member of ``role`` but those a REVOKE
    cannot keep out: the admin, a superuser or CREATEROLE login, a membership WITH ADMIN
    OPTION (each could grant it back; PostgreSQL 16 gives a CREATEROLE login that option
    in every role it creates: a DBA's login that made the roles by hand keeps it).
    Returns the report's keys: ``revoked_access_for``, ``members_left``, ``kept_access_for``."""
    from psycopg import sql

    done: dict = {"revoked_access_for": [], "members_left": []}
    # From PostgreSQL 16 a membership is one grant per grantor and REVOKE removes only the
    # current role's unless GRANTED BY names another: name each (15 has one grant).
    by_grantor = conn.info.server_version >= 160000
    members = conn.execute(
        "SELECT m.rolname, bool_or(am.admin_option) OR bool_or(m.rolsuper OR m.rolcreaterole), "
        "array_agg(DISTINCT g.rolname) FROM pg_auth_members am JOIN pg_roles r ON r.oid = am.roleid "
        "JOIN pg_roles m ON m.oid = am.member LEFT JOIN pg_roles g ON g.oid = am.grantor "
        "WHERE r.rolname = %s GROUP BY m.rolname ORDER BY m.rolname", (role,)).fetchall()
    for member, could_grant_back, grantors in members:
        # LEFT JOIN: on 15 a grant outlives the role that made it (review29: such a member
        # was neither revoked nor reported); its grantor has no name then.
        grantors = [g for g in grantors if g is not None]
        if member in (keep_access_for, admin):
            continue
        if could_grant_back:
            done["members_left"].append(member)
            continue
        for grantor in grantors if by_grantor and grantors else [None]:
            conn.execute(sql.SQL("REVOKE {} FROM {}{}").format(
                sql.Identifier(role), sql.Identifier(member),
                sql.SQL(" GRANTED BY {}").format(sql.Identifier(grantor)) if grantor else sql.SQL("")))
        # A REVOKE that removed nothing is only a WARNING: read back, never report it done.
        if conn.execute("SELECT 1 FROM pg_auth_members am JOIN pg_roles r ON r.oid = am.roleid "
                        "JOIN pg_roles m ON m.oid = am.member WHERE r.rolname = %s AND m.rolname = %s",
                        (role, member)).fetchone():
            raise ValueError(f"role {member} is still a member of {role} after REVOKE (granted by "
                             f"{', '.join(grantors) or 'a dropped role'}): revoke it as that grantor, then run this again; nothing "
                             "was changed")
        done["revoked_access_for"].append(member)
    if keep_access_for:
        conn.execute(sql.SQL("GRANT {} TO {}").format(sql.Identifier(role), sql.Identifier(keep_access_for)))
        done["kept_access_for"] = keep_access_for
    return done


def _lock_timeout_message(conn, lock_timeout_s: float) -> str:
    """The error of a provisioning rolled back at its lock_timeout: who holds locks on the
    services' tables (or the provisioning's own lock) now, and what to do."""
    holders = conn.execute(
        "SELECT a.pid, coalesce(a.usename, '?'), coalesce(nullif(a.application_name, ''), '-'), "
        "a.state, extract(epoch FROM now() - coalesce(a.xact_start, a.query_start))::int, "
        "string_agg(DISTINCT CASE WHEN l.locktype = 'advisory' THEN 'the provisioning lock (another "
        "hearth db provision-roles)' ELSE l.relation::regclass::text || ' (' || l.mode || ')' END, ', ') "
        "FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
        "WHERE l.granted AND l.pid <> pg_backend_pid() AND "
        "((l.locktype = 'relation' AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
        "  AND l.relation IN (SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "                     WHERE n.nspname = ANY(%s))) "
        " OR (l.locktype = 'advisory' AND l.classid = 0 AND l.objid = %s)) "
        "GROUP BY 1, 2, 3, 4, 5 ORDER BY 1",
        ([schema_of(s) for s in SERVICES], ADVISORY_LOCK)).fetchall()
    held = "; ".join(f"pid {pid} (user {user}, application {app}, "
                     + (f"{state}, transaction open {age} s" if state is not None else
                        # pg_stat_activity hides another login's state and times from an admin
                        # that is no superuser, nor a member of it or of pg_read_all_stats.
                        "its state and age hidden from this admin login, which is no superuser")
                     + f") on {what}" for pid, user, app, state, age, what in holders) or \
        "no session holds one now (it has ended: run it again)"
    return (f"a lock was not granted within --lock-timeout {lock_timeout_s:g} s; nothing was changed (one "
            f"transaction, rolled back). Holding locks on the services' tables: {held}. Let those transactions "
            "end (the old pods' work, or end an idle one: SELECT pg_terminate_backend(pid)) and run "
            "`hearth db provision-roles` again, or give it longer with --lock-timeout SECONDS")


def _provision_one(conn, database: str, service: str, role: str, password: str | None,
                   others: list[str], connection_limit: int, as_provisioned: bool = False,
                   superuser: bool = True) -> dict:
    """``superuser``: whether the admin is one; if not (a managed server's CREATEROLE
    admin), what only a superuser may do is checked or reported instead (``not_done``)."""
    from psycopg import sql

    schema = schema_of(service)
    ident, schema_ident = sql.Identifier(role), sql.Identifier(schema)
    existing = conn.execute("SELECT rolsuper, rolconnlimit, rolreplication, rolbypassrls FROM pg_roles "
                            "WHERE rolname = %s", (role,)).fetchone()
    if existing and existing[0]:
        raise ValueError(f"{service_dsn_variable(service)}: role {role} is a superuser; a service's login must "
                         "not be (it would reach every schema): name a role of its own")
    if not existing:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(ident))
    elif as_provisioned:
        connection_limit = existing[1]   # as the chart's Job set it (a restore changes no limit)
    not_done: list[str] = []
    # Re-stated every run: a role made by hand with more is brought back to this.
    if superuser:
        conn.execute(sql.SQL("ALTER ROLE {} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS "
                             "INHERIT CONNECTION LIMIT {}").format(ident, sql.Literal(connection_limit)))
    else:
        # Only a superuser may state SUPERUSER, REPLICATION or BYPASSRLS, even to take them
        # away: read instead. A role made here has none (CREATE ROLE's defaults); one that
        # has one was given it by a superuser, and only one can take it back.
        given = [name for name, has in (("REPLICATION", existing and existing[2]),
                                        ("BYPASSRLS", existing and existing[3])) if has]
        if given:
            raise ValueError(f"{service_dsn_variable(service)}: role {role} has {' and '.join(given)}, which only a "
                             "superuser may take away (a service's login must have neither): ask one to ALTER ROLE "
                             f"{role} NO{' NO'.join(given)}, or name a new role; nothing was changed")
        _become_member(conn, role)
        conn.execute(sql.SQL("ALTER ROLE {} LOGIN NOCREATEDB NOCREATEROLE INHERIT CONNECTION LIMIT {}").format(
            ident, sql.Literal(connection_limit)))
    if password is not None:
        # Hashed here (libpq's PQencryptPasswordConn, the server's password_encryption) and
        # only the verifier sent: the statement with the plaintext is written whole to the
        # server's log under log_statement = ddl and kept by pg_stat_statements (review28).
        verifier = conn.pgconn.encrypt_password(password.encode(), role.encode()).decode()
        conn.execute(sql.SQL("ALTER ROLE {} PASSWORD {}").format(ident, sql.Literal(verifier)))
    settings_reset = _reset_settings(conn, role, database, schema)
    conn.execute(sql.SQL("ALTER ROLE {} IN DATABASE {} SET search_path = {}").format(
        ident, sql.Identifier(database), schema_ident))
    if settings_left := _settings_of(conn, role, database, schema):
        # RESET ALL by a login that is no superuser keeps what only a superuser may set.
        not_done.append(f"settings a superuser set on the role stay ({', '.join(settings_left)}): only a superuser "
                        "may reset them")
        settings_reset = [item for item in settings_reset if item not in settings_left]
    conn.execute(sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(sql.Identifier(database), ident))
    found = conn.execute("SELECT pg_get_userbyid(nspowner) FROM pg_namespace WHERE nspname = %s",
                         (schema,)).fetchone()
    transferred = 0
    if found is None:
        conn.execute(sql.SQL("CREATE SCHEMA {} AUTHORIZATION {}").format(schema_ident, ident))
    else:
        if not superuser and found[0] != role:
            _become_member(conn, found[0])      # ALTER … OWNER TO needs the old owner's rights
        if found[0] != role:
            conn.execute(sql.SQL("ALTER SCHEMA {} OWNER TO {}").format(schema_ident, ident))
        transferred = _hand_over(conn, schema, role, superuser)
    conn.execute(sql.SQL("REVOKE ALL ON SCHEMA {} FROM PUBLIC").format(schema_ident))
    for other in others:
        if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (other,)).fetchone():
            conn.execute(sql.SQL("REVOKE ALL ON SCHEMA {} FROM {}").format(schema_ident, sql.Identifier(other)))
            conn.execute(sql.SQL("REVOKE ALL ON ALL TABLES IN SCHEMA {} FROM {}").format(
                schema_ident, sql.Identifier(other)))
            conn.execute(sql.SQL("REVOKE ALL ON ALL SEQUENCES IN SCHEMA {} FROM {}").format(
                schema_ident, sql.Identifier(other)))
    conn.execute(sql.SQL("REVOKE ALL ON ALL TABLES IN SCHEMA {} FROM PUBLIC").format(schema_ident))
    not_done += _grant_wal_purge(conn, ident, superuser)
    return {"role": role, "schema": schema, "created_role": not existing, "created_schema": found is None,
            "previous_owner": found[0] if found else None, "objects_handed_over": transferred,
            "password_set": password is not None, "connection_limit": connection_limit,
            "settings_reset": settings_reset, "not_done": not_done}


def _become_member(conn, role: str) -> None:
    """Make the admin (no superuser) a member of ``role`` with its rights and SET ROLE to
    it, as owning or handing over a schema to it, or acting as its owner, requires of
    anyone but a superuser. PostgreSQL 16 gives a CREATEROLE login ADMIN OPTION on the
    roles it creates, but neither INHERIT nor SET (``createrole_self_grant`` unset)."""
    import psycopg
    from psycopg import sql

    sixteen = conn.info.server_version >= 160000
    has = conn.execute("SELECT pg_has_role(current_user, %s, 'USAGE')" + (" AND pg_has_role(current_user, %s, 'SET')"
                       if sixteen else ""), (role, role) if sixteen else (role,)).fetchone()[0]
    if not has:
        try:
            with conn.transaction():
                conn.execute(sql.SQL("GRANT {} TO CURRENT_USER{}").format(
                    sql.Identifier(role), sql.SQL(" WITH INHERIT TRUE, SET TRUE") if sixteen else sql.SQL("")))
        except psycopg.errors.InsufficientPrivilege:
            # On 16 a CREATEROLE login may grant only roles it holds WITH ADMIN OPTION:
            # those it created. One made by another login (a superuser, another admin) not.
            admin = conn.execute("SELECT current_user").fetchone()[0]
            raise ValueError(f"{ADMIN_DSN_VARIABLE}: role {admin} may not make itself a member of role {role}, "
                             f"which it did not create (PostgreSQL 16 lets a CREATEROLE login grant only roles it "
                             f"holds WITH ADMIN OPTION): as the role that created {role} (or a superuser), GRANT "
                             f"{role} TO {admin} WITH ADMIN OPTION, then run this again; nothing was changed") from None


def _grant_wal_purge(conn, ident, superuser: bool) -> list[str]:
    """The erasure purge's ``pg_switch_wal(); CHECKPOINT`` (services/common/storage/sql.py
    purge_erased): ``pg_checkpoint`` and EXECUTE on ``pg_switch_wal()``. An admin that is
    no superuser grants what it may — ``pg_checkpoint`` on 15 (CREATEROLE), on 16 only
    WITH ADMIN OPTION on it; ``pg_switch_wal()`` only WITH GRANT OPTION, which managed
    servers do not give — and names the rest: the purge then still rewrites the tables,
    and each erasure receipt says ``complete: false``, naming the missing privilege (on
    a managed server its WAL archive keeps the erased rows for its backup retention in
    any case: docs/operations.md "A managed PostgreSQL")."""
    import psycopg
    from psycopg import sql

    if superuser:
        conn.execute(sql.SQL("GRANT pg_checkpoint TO {}").format(ident))
        conn.execute(sql.SQL("GRANT EXECUTE ON FUNCTION pg_switch_wal() TO {}").format(ident))
        return []
    not_done = []
    try:
        with conn.transaction():        # a savepoint: the run goes on without this grant
            conn.execute(sql.SQL("GRANT pg_checkpoint TO {}").format(ident))
    except psycopg.errors.InsufficientPrivilege as exc:
        not_done.append(f"GRANT pg_checkpoint ({exc.diag.message_primary}): the erasure purge cannot CHECKPOINT; "
                        "its receipts say complete: false")
    if conn.execute("SELECT has_function_privilege(current_user, 'pg_switch_wal()', 'EXECUTE WITH GRANT OPTION')"
                    ).fetchone()[0]:
        conn.execute(sql.SQL("GRANT EXECUTE ON FUNCTION pg_switch_wal() TO {}").format(ident))
    else:
        not_done.append("GRANT EXECUTE ON FUNCTION pg_switch_wal() (only a superuser, or a login holding it WITH "
                        "GRANT OPTION, may): the erasure purge cannot switch WAL segments; its receipts say "
                        "complete: false")
    return not_done


def _reset_settings(conn, role: str, database: str, schema: str) -> list[str]:
    """Drop every default ``role`` holds — role-wide and in any database — and say which
    (``name=value``; ``in database <db>: name=value``), but the ``search_path`` this run
    re-states. A login may set its own (``ALTER ROLE CURRENT_USER SET statement_timeout =
    1``): a compromised service could leave one that fails its every later start, which no
    run undid until session 29 (attack29b)."""
    from psycopg import sql

    rows = conn.execute(
        "SELECT d.datname, s.setconfig FROM pg_db_role_setting s JOIN pg_roles r ON r.oid = s.setrole "
        "LEFT JOIN pg_database d ON d.oid = s.setdatabase WHERE r.rolname = %s", (role,)).fetchall()
    ours = f"search_path={schema}"
    said = sorted((f"in database {db}: {item}" if db else item)
                  for db, config in rows for item in config or ()
                  if not (db == database and item == ours))
    for db, _config in rows:
        if db is None:
            conn.execute(sql.SQL("ALTER ROLE {} RESET ALL").format(sql.Identifier(role)))
        else:
            conn.execute(sql.SQL("ALTER ROLE {} IN DATABASE {} RESET ALL").format(
                sql.Identifier(role), sql.Identifier(db)))
    return said


def _settings_of(conn, role: str, database: str, schema: str) -> list[str]:
    """The defaults ``role`` still holds but the ``search_path`` provisioning sets."""
    rows = conn.execute(
        "SELECT d.datname, s.setconfig FROM pg_db_role_setting s JOIN pg_roles r ON r.oid = s.setrole "
        "LEFT JOIN pg_database d ON d.oid = s.setdatabase WHERE r.rolname = %s", (role,)).fetchall()
    return sorted((f"in database {db}: {item}" if db else item) for db, config in rows for item in config or ()
                  if not (db == database and item == f"search_path={schema}"))


def _hand_over(conn, schema: str, role: str, superuser: bool = True) -> int:
    """Make ``role`` the owner of every table, view and sequence of ``schema`` (the
    single-login layout's are the old login's). Tables first: a sequence a column owns
    (BIGSERIAL) follows its table and cannot be given away alone. Returns how many."""
    from psycopg import sql

    count = 0
    for kinds, keyword in ((("r", "p"), "TABLE"), (("v",), "VIEW"), (("m",), "MATERIALIZED VIEW"),
                           (("S",), "SEQUENCE")):
        rows = conn.execute(
            "SELECT c.relname, pg_get_userbyid(c.relowner) FROM pg_class c JOIN pg_namespace n "
            "ON n.oid = c.relnamespace WHERE n.nspname = %s AND c.relkind = ANY(%s) AND pg_get_userbyid(c.relowner) <> %s "
            "ORDER BY c.relname", (schema, list(kinds), role)).fetchall()
        for name, owner in rows:
            if not superuser:
                _become_member(conn, owner)      # anyone else must hold the old owner's rights
            conn.execute(sql.SQL("ALTER {} {}.{} OWNER TO {}").format(
                sql.SQL(keyword), sql.Identifier(schema), sql.Identifier(name), sql.Identifier(role)))
            count += 1
    left = conn.execute(
        "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = %s AND pg_get_userbyid(c.relowner) <> %s", (schema, role)).fetchone()[0]
    if left:
        raise ValueError(f"{left} object(s) of schema {schema} are still owned by another role after the hand-over")
    return count


def service_dsns(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Each service's DSN from HEARTH_POSTGRES_DSN_<SERVICE>, for the services that have one."""
    env = os.environ if environ is None else environ
    return {s: env[service_dsn_variable(s)] for s in SERVICES if env.get(service_dsn_variable(s))}


def run_provision(args: argparse.Namespace) -> int:
    admin = os.environ.get(ADMIN_DSN_VARIABLE, "")
    if not admin:
        raise ValueError(f"{ADMIN_DSN_VARIABLE} is required (a superuser's DSN, or a managed server's admin "
                         "login: CREATEROLE, owner of the database; used for provisioning only)")
    chosen = args.service or list(SERVICES)
    dsns = {s: dsn for s, dsn in service_dsns().items() if s in chosen}
    missing = [service_dsn_variable(s) for s in chosen if s not in dsns]
    if missing:
        raise ValueError(f"{', '.join(missing)} required: each service's own DSN (its role and password)")
    print(json.dumps(provision_roles(admin, dsns, keep_access_for=args.keep_access_for,
                                     connection_limit=args.connection_limit, lock_timeout_s=args.lock_timeout),
                     sort_keys=True))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    db = subparsers.add_parser("db", help="PostgreSQL administration")
    commands = db.add_subparsers(dest="db_command", required=True)
    provision = commands.add_parser(
        "provision-roles", help="one login per service, owner of its schema only (idempotent; "
                                f"{ADMIN_DSN_VARIABLE} and HEARTH_POSTGRES_DSN_<SERVICE>)")
    provision.add_argument("--keep-access-for", default="", metavar="OLD_LOGIN",
                           help="upgrading from one shared login: make it a member of every service role "
                                "until the rollout is done (revoke it after; docs/operations.md)")
    provision.add_argument("--lock-timeout", type=float, default=DEFAULT_LOCK_TIMEOUT_S, metavar="SECONDS",
                           help="how long a statement waits for a lock (a running service's transaction on a "
                                "table handed over) before everything is rolled back and the holders named "
                                f"(default {DEFAULT_LOCK_TIMEOUT_S:g})")
    provision.add_argument("--connection-limit", type=int, default=None, metavar="N",
                           help="each service role's CONNECTION LIMIT (default: HEARTH_POSTGRES_POOL_MAX x "
                                f"{REPLICA_ALLOWANCE} + {SPARE_CONNECTIONS}; -1: none)")
    provision.add_argument("--service", action="append", choices=SERVICES, metavar="SERVICE",
                           help="provision only this service (repeat for several; default: all four): a service "
                                "whose database is on another server than the others' gets a run of its own, with "
                                "that server's admin DSN")
    provision.set_defaults(func=run_provision)
