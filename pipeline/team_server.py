"""A local MLflow team server to try team mode on one machine: ``make team-server``.

It starts a PostgreSQL cluster of its own in a folder (``.mlflow-team/`` by default: created and
initialised on first use, reused afterwards) on a private port of 127.0.0.1, then ``mlflow server``
with that database as its backend store and the artifacts proxied by the server into
``<folder>/artifacts`` (``--artifacts-destination``), in the foreground; when the server stops
(Ctrl-C), so does the database. Clients then log with ``MLFLOW_TRACKING_URI=http://127.0.0.1:5000``.
A lab's shared server runs the same ``mlflow server`` command against its own PostgreSQL and object
store (README, *Team mode*).

PostgreSQL refuses to run as root; started by root, the cluster runs as the ``postgres`` account
that Debian's package creates. The database accepts connections from 127.0.0.1 only, without a
password: it is for one machine, never for a network.
"""

from __future__ import annotations

import argparse
import os
import pwd
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

DEFAULT_DIR = Path(".mlflow-team")
DB_NAME = "mlflow"
DB_USER = "mlflow"
SERVICE_ACCOUNT = "postgres"  # the account Debian's postgresql package creates; the cluster runs as it under root


def postgres_bin() -> Path | None:
    """The folder of PostgreSQL's server programs (``initdb``, ``pg_ctl``): on PATH, else the newest
    version under /usr/lib/postgresql (Debian keeps them off PATH); None when not installed."""
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).resolve().parent  # a link on PATH leads to the folder of all the programs
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=lambda p: int(p.parts[-3])
                      if p.parts[-3].isdigit() else 0)
    return versions[-1].parent if versions else None


def service_account() -> str | None:
    """The account the cluster runs as: None (this user) unless this is root, then ``postgres``."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(SERVICE_ACCOUNT)
    except KeyError:
        raise RuntimeError(f"PostgreSQL refuses to run as root and there is no {SERVICE_ACCOUNT!r} account to run it "
                           "as; start the team server as a normal user") from None
    return SERVICE_ACCOUNT


@dataclass(frozen=True)
class Postgres:
    """A PostgreSQL cluster in ``data_dir`` serving 127.0.0.1:``port``."""

    bin_dir: Path
    data_dir: Path
    port: int
    run_as: str | None

    @property
    def uri(self) -> str:
        """The SQLAlchemy URI of the MLflow database (the psycopg2 driver named, as SQLAlchemy 2.1 would
        otherwise pick psycopg 3)."""
        return f"postgresql+psycopg2://{DB_USER}@127.0.0.1:{self.port}/{DB_NAME}"

    def server_command(self, program: str, *args: str) -> list[str]:
        """``program`` of the PostgreSQL server tools, run as the cluster's account."""
        command = [str(self.bin_dir / program), *args]
        return ["runuser", "-u", self.run_as, "--", *command] if self.run_as else command

    def client_command(self, program: str, *args: str) -> list[str]:
        """``program`` of the client tools, connected to this cluster as the MLflow user."""
        return [str(self.bin_dir / program), "-h", "127.0.0.1", "-p", str(self.port), "-U", DB_USER, *args]


def _run(command: list[str], what: str) -> str:
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"{what} failed ({' '.join(command)}):\n{(done.stdout + done.stderr).strip()[-2000:]}")
    return done.stdout


def start_postgres(folder: Path, port: int) -> Postgres:
    """Start the cluster in ``folder/pg`` on 127.0.0.1:``port`` (initialised on first use) and make sure
    the MLflow database exists; return it running."""
    bin_dir = postgres_bin()
    if bin_dir is None:
        raise RuntimeError("PostgreSQL is not installed (no pg_ctl on PATH or under /usr/lib/postgresql); "
                           "install it, e.g. apt-get install postgresql")
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    pg = Postgres(bin_dir, folder / "pg", port, service_account())
    if pg.run_as:
        shutil.chown(folder, user=pg.run_as)
        reachable = subprocess.run(["runuser", "-u", pg.run_as, "--", "test", "-w", str(folder)])
        if reachable.returncode != 0:
            raise RuntimeError(f"{folder}: the {pg.run_as!r} account that runs PostgreSQL cannot write here (a folder "
                               "above it is private); choose a folder it can reach, e.g. --dir /tmp/wbc-team")
    if not (pg.data_dir / "PG_VERSION").is_file():
        _run(pg.server_command("initdb", "-D", str(pg.data_dir), "-U", DB_USER, "-A", "trust", "-E", "UTF8",
                               "--locale=C"), "initdb")
    options = f"-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories=''"
    _run(pg.server_command("pg_ctl", "-D", str(pg.data_dir), "-l", str(folder / "postgres.log"), "-o", options,
                           "-w", "start"), f"starting PostgreSQL (log: {folder / 'postgres.log'})")
    try:
        exists = _run(pg.client_command("psql", "-d", "postgres", "-tAc",
                                        f"SELECT 1 FROM pg_database WHERE datname = '{DB_NAME}'"), "psql")
        if not exists.strip():
            _run(pg.client_command("createdb", DB_NAME), "createdb")
    except (OSError, RuntimeError):
        stop_postgres(pg)
        raise
    return pg


def stop_postgres(pg: Postgres) -> None:
    """Stop the cluster (fast shutdown: open connections are closed)."""
    _run(pg.server_command("pg_ctl", "-D", str(pg.data_dir), "-m", "fast", "-w", "stop"), "stopping PostgreSQL")


def mlflow_server_command(backend_uri: str, artifacts: Path, host: str = "127.0.0.1", port: int = 5000,
                          workers: int = 4) -> list[str]:
    """``mlflow server`` with ``backend_uri`` as backend store and artifacts proxied into ``artifacts``."""
    return [str(Path(sys.executable).with_name("mlflow")), "server", "--backend-store-uri", backend_uri,
            "--artifacts-destination", Path(artifacts).resolve().as_uri(), "--host", host, "--port", str(port),
            "--workers", str(workers)]


def main(argv: list[str] | None = None) -> int:
    """Start PostgreSQL and ``mlflow server`` in the foreground; stop both on Ctrl-C or SIGTERM."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.team_server", description=__doc__.split("\n")[0])
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR,
                        help="folder of the database cluster and the artifacts (default: %(default)s)")
    parser.add_argument("--port", type=int, default=5000, help="port of the MLflow server (default: %(default)s)")
    parser.add_argument("--db-port", type=int, default=5433, help="port of PostgreSQL (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=4, help="MLflow server processes (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        pg = start_postgres(args.dir, args.db_port)
    except RuntimeError as exc:
        print(f"team server: {exc}", file=sys.stderr)
        return 1
    artifacts = args.dir.resolve() / "artifacts"
    artifacts.mkdir(exist_ok=True)
    print(f"PostgreSQL on 127.0.0.1:{args.db_port} ({pg.data_dir}); MLflow on http://127.0.0.1:{args.port}, "
          f"artifacts in {artifacts}\nlog to it with: export MLFLOW_TRACKING_URI=http://127.0.0.1:{args.port}",
          flush=True)
    server = subprocess.Popen(mlflow_server_command(pg.uri, artifacts, port=args.port, workers=args.workers))
    signal.signal(signal.SIGTERM, lambda *_: server.terminate())
    try:
        return server.wait()
    except KeyboardInterrupt:
        server.terminate()
        return server.wait()
    finally:
        stop_postgres(pg)


if __name__ == "__main__":
    sys.exit(main())
