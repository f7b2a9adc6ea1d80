"""The team's MLflow tracking server: PostgreSQL and ``mlflow server`` with basic authentication.

    export MLFLOW_TRACKING_USERNAME=admin MLFLOW_TRACKING_PASSWORD='at least 12 characters'
    hf-text-pipeline server start      # make server: prints the URI and the exports clients need
    hf-text-pipeline server status
    hf-text-pipeline server stop       # make server-stop

``start`` runs PostgreSQL (Debian's ``postgresql`` package) with its data in the project's
ignored state (``.state/server/pg``), listening on 127.0.0.1 only, and ``mlflow server`` on
127.0.0.1 with it as the backend store, artifacts proxied by the server (``--serve-artifacts``)
into ``.state/server/mlartifacts`` or any fsspec/S3 URI given by ``--artifacts-destination``,
and MLflow's basic authentication. Starting again while both run only reports them; ``stop``
ends both, with every process they started.

Credentials come from the environment and none is written to disk: the admin account is
MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD of whoever starts the server (created, or
its password set, at every start); the password of PostgreSQL's ``mlflow`` role is PGPASSWORD,
or a new random one at every start, set over PostgreSQL's local socket (peer authentication);
the Flask secret is MLFLOW_FLASK_SERVER_SECRET_KEY, or a new random one at every start. The
generated ``basic_auth.ini`` holds the auth database's address, no secret.

Run as root, PostgreSQL runs as the ``postgres`` user (it refuses root), so the state folder
must be reachable by that user.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from pipeline.errors import PipelineError

STATE_DIR = Path(".state") / "server"
DEFAULT_PORT = 5000
# Not 5432, where a system-wide PostgreSQL of the distribution listens.
DEFAULT_PG_PORT = 55432
DEFAULT_WORKERS = 2
# The PostgreSQL role that MLflow connects as, which owns both databases.
ROLE = "mlflow"
TRACKING_DB, AUTH_DB = "mlflow", "mlflow_auth"
USERNAME_ENV, PASSWORD_ENV = "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"
SECRET_KEY_ENV = "MLFLOW_FLASK_SERVER_SECRET_KEY"
MIN_PASSWORD_LENGTH = 12  # MLflow's basic auth refuses shorter passwords
AUTH_CACHE_S = 60  # how long a checked password is trusted (see write_auth_config)
# MLflow's first start creates its schema (migrations take seconds on a loaded machine).
READY_TIMEOUT_S = 240


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-text-pipeline server",
                                     description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["start", "stop", "status"])
    parser.add_argument("--state-dir", type=Path,
                        help=f"the server's database, logs and artifacts (default: {STATE_DIR} "
                        "in the project)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                        help=f"the MLflow server's port on 127.0.0.1 (default {DEFAULT_PORT})")
    parser.add_argument("--pg-port", type=int, default=DEFAULT_PG_PORT,
                        help=f"PostgreSQL's port on 127.0.0.1 (default {DEFAULT_PG_PORT})")
    parser.add_argument("--artifacts-destination",
                        help="where the server stores artifacts: a folder or any fsspec/S3 URI "
                        "(s3://bucket/path needs boto3 and AWS credentials in the environment; "
                        "default: <state dir>/mlartifacts)")
    parser.add_argument("--workers", type=int, default=DEFAULT_WORKERS,
                        help=f"MLflow server worker processes (default {DEFAULT_WORKERS})")
    parser.add_argument("--pg-bin", type=Path,
                        help="PostgreSQL's programs (default: the newest "
                        "/usr/lib/postgresql/<version>/bin, else initdb's folder on PATH)")
    return parser


@dataclass(frozen=True)
class State:
    """The files of one server, all under ``root``."""

    root: Path

    @property
    def pg_dir(self) -> Path:  # owned by the user PostgreSQL runs as; its socket lives here
        return self.root / "pg"

    @property
    def data_dir(self) -> Path:
        return self.pg_dir / "data"

    @property
    def pg_log(self) -> Path:
        return self.pg_dir / "postgresql.log"

    @property
    def log(self) -> Path:
        return self.root / "mlflow-server.log"

    @property
    def record(self) -> Path:  # the running server: pid, URI, ports (no secret)
        return self.root / "server.json"

    @property
    def auth_config(self) -> Path:
        return self.root / "basic_auth.ini"

    @property
    def artifacts(self) -> Path:
        return self.root / "mlartifacts"


class Postgres:
    """PostgreSQL's programs, run as the ``postgres`` user under root (``initdb`` and the server
    refuse root), as the calling user otherwise."""

    def __init__(self, bin_dir: Path, state: State) -> None:
        self.bin_dir, self.state = bin_dir, state
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    @staticmethod
    def find(explicit: Optional[Path]) -> Path:
        candidates = [explicit] if explicit else sorted(
            Path("/usr/lib/postgresql").glob("*/bin"),
            key=lambda p: [int(x) for x in p.parent.name.split(".") if x.isdigit()],
            reverse=True)
        if not explicit and shutil.which("initdb"):
            candidates.append(Path(shutil.which("initdb")).parent)
        for folder in candidates:
            if (folder / "initdb").is_file() and (folder / "pg_ctl").is_file():
                return folder
        raise PipelineError(
            f"PostgreSQL not found ({explicit or '/usr/lib/postgresql/<version>/bin'}): install "
            "it (apt-get install postgresql) or name its bin folder with --pg-bin")

    def run(self, program: str, *args: str, stdin: Optional[str] = None,
            check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run([*self.as_user, str(self.bin_dir / program), *args],
                              cwd=self.state.pg_dir, input=stdin, capture_output=True, text=True,
                              timeout=120)
        if check and done.returncode != 0:
            raise PipelineError(f"PostgreSQL's {program} failed: "
                                f"{_last_line(done.stderr or done.stdout)}")
        return done

    def prepare(self) -> None:
        """The folder PostgreSQL owns, reachable by it."""
        folder = self.state.pg_dir
        folder.mkdir(parents=True, exist_ok=True)
        if self.as_user:
            import pwd

            try:
                account = pwd.getpwnam("postgres")
            except KeyError:
                raise PipelineError("run as root, PostgreSQL needs the `postgres` user, which "
                                    "Debian's postgresql package creates") from None
            os.chown(folder, account.pw_uid, account.pw_gid)
        folder.chmod(0o700)
        if self.as_user and subprocess.run([*self.as_user, "test", "-w", str(folder)]).returncode:
            raise PipelineError(
                f"PostgreSQL runs as user postgres, which cannot reach {folder}: make the "
                "folders above it traversable (chmod o+x) or choose another --state-dir")

    def running_port(self) -> Optional[int]:
        """The port of the PostgreSQL server running on the data folder, None if none runs."""
        if not (self.state.data_dir / "PG_VERSION").is_file():
            return None
        if self.run("pg_ctl", "status", "-D", str(self.state.data_dir), check=False).returncode:
            return None
        lines = (self.state.data_dir / "postmaster.pid").read_text().splitlines()
        return int(lines[3])

    def start(self, port: int) -> None:
        if not (self.state.data_dir / "PG_VERSION").is_file():
            # Local (socket) connections: the user PostgreSQL runs as, by the OS account (peer);
            # TCP connections (MLflow's): by password.
            self.run("initdb", "-D", str(self.state.data_dir), "-E", "UTF8", "--no-locale",
                     "--auth-local=peer", "--auth-host=scram-sha-256", "--no-sync")
        _refuse_taken_port(port, "--pg-port")
        options = (f"-c listen_addresses=127.0.0.1 -p {port} "
                   f"-k {shlex.quote(str(self.state.pg_dir))}")
        done = self.run("pg_ctl", "start", "-D", str(self.state.data_dir), "-l",
                        str(self.state.pg_log), "-w", "-t", "60", "-o", options, check=False)
        if done.returncode:
            raise PipelineError(f"PostgreSQL did not start: {_last_line(self.state.pg_log)} "
                                f"(log: {self.state.pg_log})")

    def stop(self) -> bool:
        if self.running_port() is None:
            return False
        self.run("pg_ctl", "stop", "-D", str(self.state.data_dir), "-m", "fast", "-w", "-t", "60")
        return True

    def set_role_password(self, port: int, password: str) -> None:
        """Create MLflow's role and databases if missing, and set the role's password, as the
        superuser over the local socket (no password needed, none written anywhere)."""
        literal = "'" + password.replace("'", "''") + "'"
        exists = "SELECT FROM pg_{} WHERE {} = '{}'"
        script = "\n".join([
            f"SELECT 'CREATE ROLE {ROLE} LOGIN' "
            f"WHERE NOT EXISTS ({exists.format('roles', 'rolname', ROLE)}) \\gexec",
            f"ALTER ROLE {ROLE} PASSWORD {literal};",
            *(f"SELECT 'CREATE DATABASE {name} OWNER {ROLE}' "
              f"WHERE NOT EXISTS ({exists.format('database', 'datname', name)}) \\gexec"
              for name in (TRACKING_DB, AUTH_DB)), ""])
        done = self.run("psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h",
                        str(self.state.pg_dir), "-p", str(port), "-d", "postgres", "-f", "-",
                        stdin=script, check=False)
        if done.returncode:
            raise PipelineError("could not set up MLflow's PostgreSQL role and databases: "
                                + _last_line(done.stderr).replace(literal, "'***'"))


def _last_line(text_or_file: Any) -> str:
    if isinstance(text_or_file, Path):
        text = text_or_file.read_text(errors="replace") if text_or_file.is_file() else ""
    else:
        text = text_or_file or ""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:500] if lines else "no message"


def _refuse_taken_port(port: int, option: str) -> None:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            raise PipelineError(f"port {port} on 127.0.0.1 is taken: choose another with "
                                f"{option}") from None


def database_uri(port: int, database: str) -> str:
    """SQLAlchemy's address of a database, without the password (libpq reads PGPASSWORD).
    ``+psycopg`` names psycopg 3, the driver of the ``server`` extra, whatever SQLAlchemy's
    default for ``postgresql://`` (psycopg2 before SQLAlchemy 2.1)."""
    return f"postgresql+psycopg://{ROLE}@127.0.0.1:{port}/{database}"


def admin_credentials() -> tuple[str, str]:
    username, password = os.environ.get(USERNAME_ENV), os.environ.get(PASSWORD_ENV)
    if not username or not password:
        raise PipelineError(f"set {USERNAME_ENV} and {PASSWORD_ENV}: the server's admin "
                            "account (and yours as a client)")
    if len(password) < MIN_PASSWORD_LENGTH:
        raise PipelineError(f"{PASSWORD_ENV} is {len(password)} characters long; MLflow's "
                            f"basic auth needs at least {MIN_PASSWORD_LENGTH}")
    return username, password


def _require_server_packages() -> None:
    import importlib.util

    missing = [name for module, name in (("psycopg", "psycopg[binary]"),
                                         ("flask_wtf", "Flask-WTF"))
               if importlib.util.find_spec(module) is None]
    if missing:
        raise PipelineError(f"the server needs {' and '.join(missing)}: pip install -e "
                            "'.[server]'")


@contextlib.contextmanager
def _environment(**values: str):
    """``values`` in this process's environment while the block runs."""
    before = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def set_admin(auth_uri: str, username: str, password: str, pg_password: str) -> None:
    """Create the admin account in the auth database, or set its password (MLflow itself only
    reads MLFLOW_AUTH_ADMIN_PASSWORD while no admin exists)."""
    import warnings

    from mlflow.exceptions import MlflowException

    with warnings.catch_warnings():  # the server's web stack warns of its own deprecations
        warnings.simplefilter("ignore")
        from mlflow.server.auth.sqlalchemy_store import SqlAlchemyStore

    with _environment(PGPASSWORD=pg_password):
        store = SqlAlchemyStore()
        store.init_db(auth_uri)
        try:
            if store.has_user(username, use_primary=True):
                store.update_user(username, password=password, is_admin=True)
            else:
                store.create_user(username, password, is_admin=True)
        except MlflowException as error:  # a name or password MLflow refuses
            raise PipelineError(f"{USERNAME_ENV}/{PASSWORD_ENV}: {error.message}") from None
        finally:
            store.engine.dispose()


def write_auth_config(state: State, pg_port: int, username: str) -> None:
    """MLflow's basic-auth settings. EDIT by default: a team's runs share experiments (one per
    dataset), so every account may add runs to any; deleting and managing permissions stay with
    an experiment's creator and the admins. Checked passwords are cached for a minute: MLflow
    hashes each request's password again otherwise (PBKDF2, measured 0.65 s a request here),
    which made the server the bottleneck of four parallel sweep jobs; a password changed or an
    account deleted through the API may then still work for that minute on the other worker."""
    state.auth_config.write_text(
        "[mlflow]\n"
        "default_permission = EDIT\n"
        f"database_uri = {database_uri(pg_port, AUTH_DB)}\n"
        f"admin_username = {username}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        f"auth_cache_ttl_seconds = {AUTH_CACHE_S}\n")


def _read_record(state: State) -> Optional[dict]:
    try:
        return json.loads(state.record.read_text())
    except (OSError, ValueError):
        return None


def _server_process(record: Optional[dict]):
    """The running ``mlflow server`` process the record names, None if it has gone."""
    import psutil

    if not record:
        return None
    try:
        process = psutil.Process(record["pid"])
        if abs(process.create_time() - record["started"]) < 1.0 and _alive(process):
            return process
    except (psutil.NoSuchProcess, KeyError):
        pass
    return None


def _answers(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=5):
            return True
    except OSError:
        return False


def _alive(process) -> bool:
    import psutil

    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _wait_ready(uri: str, process, log: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not _answers(f"{uri}/health"):
        if not _alive(process):
            raise PipelineError(f"mlflow server exited: {_last_line(log)} (log: {log})")
        if time.monotonic() > deadline:
            raise PipelineError(f"mlflow server did not answer in {READY_TIMEOUT_S} s "
                                f"(log: {log})")
        time.sleep(0.5)


def check_login(uri: str, username: str, password: str) -> None:
    """Fail unless the server accepts these credentials."""
    import base64
    import urllib.error
    import urllib.parse
    import urllib.request

    token = base64.b64encode(f"{username}:{password}".encode()).decode()
    request = urllib.request.Request(
        f"{uri}/api/2.0/mlflow/users/get?username={urllib.parse.quote(username)}",
        headers={"Authorization": f"Basic {token}"})
    try:
        with urllib.request.urlopen(request, timeout=30):
            return
    except urllib.error.HTTPError as error:
        raise PipelineError(f"the server at {uri} refuses {USERNAME_ENV}={username} with "
                            f"this {PASSWORD_ENV} (HTTP {error.code}); it was started with "
                            f"other credentials: `server stop`, then `server start`") from None


def _stop_server(process) -> None:
    """SIGTERM to the server's process group (the CLI, uvicorn and its workers); SIGKILL to
    what is left of it after 30 s."""
    import psutil

    with contextlib.suppress(psutil.NoSuchProcess, ProcessLookupError):
        group = os.getpgid(process.pid)
        members = [process, *process.children(recursive=True)]
        os.killpg(group, signal.SIGTERM)
        _, left = psutil.wait_procs(members, timeout=30)
        if left:
            os.killpg(group, signal.SIGKILL)
            psutil.wait_procs(left, timeout=10)


def start(args: argparse.Namespace, state: State) -> str:
    username, password = admin_credentials()
    record = _read_record(state)
    process = _server_process(record)
    if process is not None:
        _wait_ready(record["uri"], process, state.log)
        check_login(record["uri"], username, password)
        print(f"MLflow server already running at {record['uri']} (pid {record['pid']}; log "
              f"{state.log})", file=sys.stderr)
        return record["uri"]

    _require_server_packages()
    began = time.monotonic()
    postgres = Postgres(Postgres.find(args.pg_bin), state)
    state.root.mkdir(parents=True, exist_ok=True)
    postgres.prepare()
    pg_port = postgres.running_port()
    if pg_port is None:
        postgres.start(args.pg_port)
        pg_port = args.pg_port
    pg_password = os.environ.get("PGPASSWORD") or secrets.token_urlsafe(24)
    postgres.set_role_password(pg_port, pg_password)
    set_admin(database_uri(pg_port, AUTH_DB), username, password, pg_password)
    write_auth_config(state, pg_port, username)

    _refuse_taken_port(args.port, "--port")
    artifacts = args.artifacts_destination or str(state.artifacts)
    uri = f"http://127.0.0.1:{args.port}"
    env = {**os.environ, "PGPASSWORD": pg_password,
           "MLFLOW_AUTH_CONFIG_PATH": str(state.auth_config),
           "MLFLOW_AUTH_ADMIN_USERNAME": username, "MLFLOW_AUTH_ADMIN_PASSWORD": password,
           SECRET_KEY_ENV: os.environ.get(SECRET_KEY_ENV) or secrets.token_hex(32),
           # MLflow's GenAI job runner: not used here, and it would start more processes.
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    command = [str(Path(sys.executable).parent / "mlflow"), "server",
               "--backend-store-uri", database_uri(pg_port, TRACKING_DB),
               "--serve-artifacts", "--artifacts-destination", artifacts,
               "--host", "127.0.0.1", "--port", str(args.port),
               "--workers", str(args.workers), "--app-name", "basic-auth"]
    import psutil

    with state.log.open("a") as log:
        log.write(f"\n== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(command)}\n")
        log.flush()
        server = subprocess.Popen(command, cwd=state.root, env=env, stdin=subprocess.DEVNULL,
                                  stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    process = psutil.Process(server.pid)
    state.record.write_text(json.dumps({
        "pid": server.pid, "started": process.create_time(), "uri": uri, "pg_port": pg_port,
        "artifacts": artifacts}, indent=2) + "\n")
    try:
        _wait_ready(uri, process, state.log)
        check_login(uri, username, password)
    except BaseException:
        _stop_server(process)
        state.record.unlink(missing_ok=True)
        raise
    print(f"MLflow server at {uri} in {time.monotonic() - began:.1f} s: PostgreSQL on "
          f"127.0.0.1:{pg_port}, artifacts in {artifacts}, basic auth (admin {username}); "
          f"log {state.log}", file=sys.stderr)
    return uri


def stop(state: State, pg_bin: Optional[Path]) -> None:
    process = _server_process(_read_record(state))
    if process is not None:
        _stop_server(process)
        print(f"stopped the MLflow server (pid {process.pid})", file=sys.stderr)
    state.record.unlink(missing_ok=True)
    if (state.data_dir / "PG_VERSION").is_file() \
            and Postgres(Postgres.find(pg_bin), state).stop():
        print(f"stopped PostgreSQL ({state.data_dir})", file=sys.stderr)
    elif process is None:
        print("no server was running", file=sys.stderr)


def status(state: State, pg_bin: Optional[Path]) -> int:
    record = _read_record(state)
    process = _server_process(record)
    pg_port = None
    if (state.data_dir / "PG_VERSION").is_file():
        pg_port = Postgres(Postgres.find(pg_bin), state).running_port()
    print(f"MLflow server: {'running at ' + record['uri'] if process else 'not running'}; "
          f"PostgreSQL: {f'running on 127.0.0.1:{pg_port}' if pg_port else 'not running'}")
    return 0 if process and pg_port else 1


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from filelock import FileLock

    from pipeline.tracking import project_root

    state = State((args.state_dir or project_root() / STATE_DIR).resolve())
    try:
        if args.action == "status":
            return status(state, args.pg_bin)
        state.root.mkdir(parents=True, exist_ok=True)
        with FileLock(str(state.root / "server.lock"), timeout=300):  # one start or stop at once
            if args.action == "stop":
                stop(state, args.pg_bin)
                return 0
            uri = start(args, state)
    except PipelineError as error:
        print(f"server: error: {error}", file=sys.stderr)
        return 1
    # stdout holds only shell: `eval "$(hf-text-pipeline server start)"` sets it up.
    print(f"export MLFLOW_TRACKING_URI={uri}")
    print(f"export {USERNAME_ENV}={shlex.quote(os.environ[USERNAME_ENV])}")
    print(f"# and {PASSWORD_ENV} (not printed); every other user: an account the admin creates")
    return 0
