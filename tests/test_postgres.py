"""The docker-compose server configuration on a real PostgreSQL: a throwaway cluster (Debian's
postgresql package), `prefect server start` with PREFECT_API_DATABASE_CONNECTION_URL=
postgresql+asyncpg://..., a small Kiln flow run against it, and its flow run, task runs and logs
found in PostgreSQL's own tables (and read back through Prefect's client)."""

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from uuid import UUID

import pytest

from tests.prefect_servers import clean_env, free_port, run_pipeline, start_server, stop


def newest_initdb() -> Path | None:
    found = [Path(p) for p in glob.glob("/usr/lib/postgresql/*/bin/initdb")]
    return max(found, key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0) if found else None


INITDB = newest_initdb()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(INITDB is None, reason="no PostgreSQL server binaries (/usr/lib/postgresql/*/bin/initdb); "
                                              "apt-get install postgresql"),
]


@pytest.fixture
def postgres():
    """A PostgreSQL cluster on 127.0.0.1 with a database `kiln`, password auth over TCP as in the
    compose file. PostgreSQL refuses to run as root: as root, it runs as the `postgres` user."""
    run_as: list[str] = []
    owner = None
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root, and there is no `postgres` user to run PostgreSQL as")
        if not shutil.which("runuser"):
            pytest.skip("running as root, and there is no `runuser` to run PostgreSQL as `postgres`")
        run_as = ["runuser", "-u", "postgres", "--"]
    root = Path(tempfile.mkdtemp(prefix="kiln-pg-"))  # not tmp_path: the server's user must reach it
    password, port = "kiln-test-secret", free_port()
    (root / "pwfile").write_text(password + "\n")
    if owner:
        for path in (root, root / "pwfile"):
            os.chown(path, owner.pw_uid, owner.pw_gid)

    def pg(tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run([*run_as, str(INITDB.parent / tool), *args], cwd=root, capture_output=True, text=True,
                              timeout=90, env={**os.environ, "PGPASSWORD": password})
        if check and done.returncode:
            log = (root / "postgres.log").read_text()[-3000:] if (root / "postgres.log").exists() else ""
            pytest.fail(f"{tool} {' '.join(args)}: exit {done.returncode}\n{done.stdout}{done.stderr}{log}")
        return done

    def psql(sql: str) -> list[list[str]]:
        out = pg("psql", "-h", "127.0.0.1", "-p", str(port), "-U", "prefect", "-d", "kiln", "-X", "-A", "-t",
                 "-F", "\t", "-v", "ON_ERROR_STOP=1", "-c", sql).stdout
        return [line.split("\t") for line in out.splitlines() if line]

    data = str(root / "data")
    try:
        pg("initdb", "-D", data, "-U", "prefect", f"--pwfile={root / 'pwfile'}", "--auth-local=trust",
           "--auth-host=scram-sha-256", "-E", "UTF8", "--no-locale", "--no-sync")
        pg("pg_ctl", "-D", data, "-l", str(root / "postgres.log"), "-w", "-t", "60",
           "-o", f"-h 127.0.0.1 -p {port} -k {root} -F", "start")
        pg("createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "prefect", "kiln")
        yield SimpleNamespace(url=f"postgresql+asyncpg://prefect:{password}@127.0.0.1:{port}/kiln", psql=psql)
    finally:
        pg("pg_ctl", "-D", data, "-m", "immediate", "-w", "stop", check=False)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def prefect_on_postgres(postgres, tmp_path):
    """`prefect server start` on that database, as the compose file's prefect-server runs it."""
    home, log, port = tmp_path / "server-home", tmp_path / "prefect-server.log", free_port()
    env = clean_env(PREFECT_HOME=str(home), PREFECT_API_DATABASE_CONNECTION_URL=postgres.url,
                    PREFECT_SERVER_UI_ENABLED="false")
    server = start_server(port, env, tmp_path, log)
    api = f"http://127.0.0.1:{port}/api"
    try:
        yield SimpleNamespace(api=api, home=home, log=log, db=postgres)
    finally:
        stop(server)


def test_flow_and_task_runs_are_stored_in_postgres(prefect_on_postgres, tmp_path):
    server, db = prefect_on_postgres, prefect_on_postgres.db
    run = run_pipeline(server.api, tmp_path / "client-home", tmp_path / "data", "ingest",
                       ["sample_crawl.max_pages=20", "ingest.workers=1"])
    assert run["state"] == "COMPLETED"

    assert db.psql(f"""select f.name, r.name, r.state_type, r.parameters->>'until' from flow_run r
                       join flow f on f.id = r.flow_id where r.id = '{run["id"]}'""") == \
        [["pipeline", run["name"], "COMPLETED", "ingest"]]
    expected = [["sample-crawl", "COMPLETED"], ["ingest", "COMPLETED"]]
    deadline = time.time() + 30  # task runs are recorded from their events, a moment after the flow ends
    while (tasks := db.psql(f"select name, state_type from task_run where flow_run_id = '{run['id']}' "
                            "order by start_time")) != expected and time.time() < deadline:
        time.sleep(1)
    assert tasks == expected
    assert int(db.psql(f"select count(*) from log where flow_run_id = '{run['id']}'")[0][0]) > 0, "logs too"
    assert ["pg_trgm"] in db.psql("select extname from pg_extension"), "Prefect's migrations need pg_trgm (contrib)"

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: server.api}), get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(UUID(run["id"]))
        task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id])))
    assert flow_run.name == run["name"] and flow_run.state.is_completed()
    assert sorted((t.name, t.state.type.value) for t in task_runs) == sorted(map(tuple, expected))
    assert not list(server.home.rglob("*.db")), "no SQLite database beside PostgreSQL"
