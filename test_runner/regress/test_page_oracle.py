"""The page oracle (DESIGN §5, issue "Pageserver"): a workload runs on a stock Postgres primary
started from the pageserver's full backup of a fresh timeline, its WAL flowing through the
walproposer and three safekeepers into the pageserver. At several recorded LSNs, a stock Postgres
copy recovered to exactly that LSN from the same WAL is compared with what the pageserver serves
there: every block of every relation fork, relation sizes and existence, database sizes, and the
SLRU segments (`fixtures/page_oracle.py` says what is compared and what may differ, and why).

- `test_page_oracle`: pgbench, every index access method, TOAST, sequences, updates and deletes
  with vacuum, truncation, both createdb strategies, dropdb, subtransactions, 2PC, multixacts.
- `test_page_oracle_branch`: a branch at an older LSN, written to: the branch matches a copy
  that replayed the parent's WAL up to the branch point and the branch's WAL after it; the
  parent still matches its own copies.
- `test_page_oracle_pageserver_kill`: kill -9 of the pageserver during ingest, restart: ingest
  resumes and the oracle still passes.
"""

from __future__ import annotations

import subprocess
import threading
import time
import uuid
from pathlib import Path

from fixtures.page_oracle import (
    OraclePrimary,
    OracleReport,
    RecordedLsn,
    compare_backup_files,
    compare_with_pageserver,
    prev_record_lsn,
    recover_copy,
    splice_wal,
)
from fixtures.pageserver import Pageserver
from fixtures.paths import pg_bin
from fixtures.safekeeper import lsn_int


class Env:
    def __init__(self, daemons, safekeeper_cluster, test_output_dir: Path, port_allocator, ps_conf: str = ""):
        self.daemons = daemons
        self.sks = safekeeper_cluster
        self.out = test_output_dir
        self.ports = port_allocator
        self.ps = Pageserver(daemons, test_output_dir / "pageserver", port_allocator.get(), port_allocator.get(), [sk.addr for sk in safekeeper_cluster], extra_conf=ps_conf).start()
        self.tenant_id = uuid.uuid4().hex
        self.ps.create_tenant(self.tenant_id)
        self.copies = 0
        self.reports: list = []

    def new_primary(self, timeline_id: str, start_lsn: str, name: str, prev_lsn=None) -> OraclePrimary:
        for sk in self.sks:
            sk.create_timeline(self.tenant_id, timeline_id, start_lsn)
        return OraclePrimary(self.daemons, self.ps, self.sks, self.out, self.ports.get(), self.tenant_id, timeline_id, name=name).start(
            lsn=start_lsn if prev_lsn else None, prev_lsn=prev_lsn
        )

    def check(self, timeline_id: str, base_tar: bytes, wal_dir: Path, target: RecordedLsn, absent_dbs=()) -> OracleReport:
        """Recovers a copy to `target` and compares it with the pageserver's timeline there."""
        self.copies += 1
        name = f"copy{self.copies}_{target.name}"
        started = time.monotonic()
        datadir = recover_copy(self.daemons, base_tar, wal_dir, target, self.out / name / "pgdata", self.ports.get())
        recovered = time.monotonic()
        rep = compare_with_pageserver(self.ps, self.tenant_id, timeline_id, target.lsn, datadir, dump_dir=self.out / name / "mismatches", absent_dbs=absent_dbs)
        compare_backup_files(self.ps, self.tenant_id, timeline_id, target, wal_dir, datadir, rep)
        print(f"{name}: recovery {recovered - started:.1f}s, compare {time.monotonic() - recovered:.1f}s; {rep.summary()}")
        assert rep.blocks > 0
        self.reports.append((target, rep))
        self.last_copy = datadir
        return rep

    def assert_all_match(self) -> None:
        bad = [(t, r) for t, r in self.reports if r.mismatches]
        msg = []
        for t, r in bad:
            msg.append(f"{len(r.mismatches)} mismatches at {t.name} {t.lsn}:")
            msg.extend("  " + m for m in r.mismatches[:25])
        assert not bad, "\n".join(msg)


def pgbench(pg, *args: str) -> None:
    subprocess.run(
        [str(pg_bin("pgbench")), "-h", "127.0.0.1", "-p", str(pg.port), "-U", pg.user, *args, "postgres"],
        check=True,
        capture_output=True,
    )


def workload_pgbench(pg, seconds: int = 5) -> None:
    pgbench(pg, "-i", "-s", "2", "-q")
    pgbench(pg, "-T", str(seconds), "-c", "2", "-j", "2")


def workload_indexes_toast_seq_truncate(pg) -> None:
    with pg.connect() as c:
        c.execute("create table idx(id int, arr int[], pt point, txt text, tsv tsvector, rng int4range)")
        fill = (
            "insert into idx select g, array[g % 100, g % 37, g % 11], point(g % 1000, g / 1000), 'k' || (g % 5000), "
            "to_tsvector('simple', 'w' || (g % 200) || ' x' || (g % 31)), int4range(g, g + 10) from generate_series({}, {}) g"
        )
        c.execute(fill.format(1, 20000))
        for stmt in [
            "create index idx_btree on idx(id)",
            "create index idx_gin on idx using gin(arr)",
            "create index idx_gin_tsv on idx using gin(tsv) with (fastupdate = on)",
            "create index idx_gist on idx using gist(pt)",
            "create index idx_gist_rng on idx using gist(rng)",
            "create index idx_hash on idx using hash(txt)",
            "create index idx_brin on idx using brin(id) with (pages_per_range = 4)",
            "create index idx_spgist on idx using spgist(pt)",
            "create index idx_spgist_txt on idx using spgist(txt)",
        ]:
            c.execute(stmt)
        # Index inserts, updates and deletes as WAL records (the builds log page images).
        c.execute(fill.format(20001, 30000))
        c.execute("update idx set txt = txt || 'u', arr = arr || id, pt = point(pt[0] + 1, pt[1]) where id % 5 = 0")
        c.execute("delete from idx where id % 7 = 0")
        c.execute("vacuum idx")
        c.execute("update idx set rng = int4range(id, id + 3) where id % 11 = 0")  # clears VM bits
        c.execute("select brin_summarize_new_values('idx_brin')")
        # TOAST: uncompressed out-of-line values, updated and deleted.
        c.execute("create table toasty(id int primary key, v text)")
        c.execute("alter table toasty alter column v set storage external")
        c.execute("insert into toasty select g, repeat(md5(g::text), 3000) from generate_series(1, 100) g")
        c.execute("update toasty set v = repeat(md5((id + 1)::text), 2000) where id % 3 = 0")
        c.execute("delete from toasty where id % 4 = 0")
        c.execute("vacuum toasty")
        # Sequences.
        c.execute("create sequence seq1 cache 1")
        c.execute("select nextval('seq1') from generate_series(1, 500)")
        c.execute("create table seqt(id bigserial primary key, v int)")
        c.execute("insert into seqt(v) select g from generate_series(1, 1000) g")
        # Truncation: TRUNCATE (new relfilenode) and vacuum cutting off empty tail pages.
        c.execute("create table trunc_me(id int primary key, v text)")
        c.execute("insert into trunc_me select g, 'x' from generate_series(1, 10000) g")
        c.execute("truncate trunc_me")
        c.execute("insert into trunc_me select g, 'y' from generate_series(1, 100) g")
        c.execute("create table vac_trunc(id int, pad text)")
        c.execute("insert into vac_trunc select g, repeat('p', 200) from generate_series(1, 50000) g")
        c.execute("vacuum vac_trunc")  # VM and FSM exist before the truncation
        c.execute("delete from vac_trunc where id > 1234")
        c.execute("vacuum vac_trunc")
        # An unlogged table: only its init fork is WAL-logged.
        c.execute("create unlogged table unlogged_t(id int primary key)")
        c.execute("insert into unlogged_t select generate_series(1, 100)")


def workload_databases_and_xacts(pg) -> list[int]:
    """Returns the oids of the databases it dropped."""
    with pg.connect() as c:
        c.execute("create database db_wal strategy wal_log")
        c.execute("create database db_fc strategy file_copy")
        c.execute("create database db_drop strategy wal_log")
        dropped = c.execute("select oid from pg_database where datname = 'db_drop'").fetchone()[0]
    for db in ["db_wal", "db_fc", "db_drop"]:
        with pg.connect(db) as c:
            c.execute("create table t(id int primary key, v text)")
            c.execute("insert into t select g, md5(g::text) from generate_series(1, 5000) g")
            c.execute("create index on t(v)")
            c.execute("update t set v = 'u' where id % 10 = 0")
    with pg.connect() as c:
        c.execute("drop database db_drop")
        c.execute("create database db_fc2 template db_fc strategy file_copy")
    with pg.connect("db_fc2") as c:
        c.execute("insert into t select g, 'fc2' from generate_series(5001, 6000) g")
    # Subtransactions: more than fit in the proc array cache (xact assignment records).
    with pg.connect() as c:
        c.execute("create table subx(id int, v int)")
        c.execute("begin")
        for i in range(200):
            c.execute(f"savepoint s{i}")
            c.execute("insert into subx values (%s, %s)", (i, i))
            if i % 10 == 3:
                c.execute(f"rollback to savepoint s{i}")
        c.execute("commit")
        c.execute("begin")
        for i in range(70):
            c.execute(f"savepoint a{i}")
            c.execute("insert into subx values (%s, -1)", (1000 + i,))
        c.execute("rollback")
    # Two-phase commit: committed, rolled back, and one left prepared.
    with pg.connect() as c:
        c.execute("create table twopc(id int, who text)")
        for gid, end in [("p_commit", "commit prepared"), ("p_abort", "rollback prepared"), ("p_open", None)]:
            c.execute("begin")
            c.execute("insert into twopc select g, %s from generate_series(1, 100) g", (gid,))
            c.execute("savepoint s1")
            c.execute("insert into twopc values (-1, %s)", (gid,))
            c.execute(f"prepare transaction '{gid}'")
            if end:
                c.execute(f"{end} '{gid}'")
    # Multixacts: several lockers of the same rows, and a locker with an updater.
    with pg.connect() as c:
        c.execute("create table mx(id int primary key, v int)")
        c.execute("insert into mx select g, 0 from generate_series(1, 2000) g")
    conns = [pg.connect() for _ in range(3)]
    try:
        for i, c in enumerate(conns):
            c.execute("begin")
            # FOR SHARE only on rows the update below leaves alone (it would block it).
            c.execute("select * from mx where id <= 1500 for key share" if i < 2 else "select * from mx where id % 3 = 1 for share")
        conns[0].execute("update mx set v = v + 1 where id % 3 = 0")  # non-key update under key share
        for c in conns:
            c.execute("commit")
    finally:
        for c in conns:
            c.close()
    with pg.connect() as c:
        c.execute("vacuum mx")
    return [dropped]


def test_page_oracle(daemons, safekeeper_cluster, test_output_dir, port_allocator):
    env = Env(daemons, safekeeper_cluster, test_output_dir, port_allocator)
    timeline_id = uuid.uuid4().hex
    start_lsn = env.ps.create_timeline(env.tenant_id, timeline_id)["last_record_lsn"]
    p = env.new_primary(timeline_id, start_lsn, "primary")
    recorded = [p.record("start")]
    workload_pgbench(p.pg)
    recorded.append(p.record("pgbench"))
    workload_indexes_toast_seq_truncate(p.pg)
    recorded.append(p.record("indexes"))
    dropped = workload_databases_and_xacts(p.pg)
    recorded.append(p.record("databases"))
    end = p.finish_wal()
    p.wait_ingested(end)
    total = 0
    for r in recorded:
        rep = env.check(timeline_id, p.base_tar, p.archive, r, absent_dbs=tuple(dropped) if r.name == "databases" else ())
        total += rep.blocks
    print(f"{len(recorded)} LSNs, {total} blocks compared")
    p.stop()
    env.assert_all_match()

    # The oracle has teeth: one flipped byte in one block of the last copy is found, and named.
    datadir, lsn = env.last_copy, recorded[-1].lsn
    relnode = [f for f in (datadir / "base").rglob("*") if f.is_file() and f.name.isdigit() and f.stat().st_size >= 8192][0]
    data = bytearray(relnode.read_bytes())
    data[8000] ^= 0x40
    relnode.write_bytes(bytes(data))
    tampered = compare_with_pageserver(env.ps, env.tenant_id, timeline_id, lsn, datadir)
    assert len(tampered.mismatches) == 1 and f"/{relnode.name}.main block 0 at {lsn}: 1 bytes differ at [8000..8000]" in tampered.mismatches[0], tampered.mismatches


def test_page_oracle_branch(daemons, safekeeper_cluster, test_output_dir, port_allocator):
    """A branch at an older LSN of its parent, written to. The branch's reference copy replays
    one WAL history: the parent's up to the branch point, then the branch primary's (which
    starts with the checkpoint record of the backup it started from)."""
    env = Env(daemons, safekeeper_cluster, test_output_dir, port_allocator)
    parent_tl = uuid.uuid4().hex
    start_lsn = env.ps.create_timeline(env.tenant_id, parent_tl)["last_record_lsn"]
    parent = env.new_primary(parent_tl, start_lsn, "parent")
    workload_pgbench(parent.pg, seconds=3)
    with parent.pg.connect() as c:
        c.execute("create table shared_t(id int primary key, v text)")
        c.execute("insert into shared_t select g, 'before the branch' from generate_series(1, 5000) g")
    branch_point = parent.record("branch_point")
    # The parent goes on after the branch point: none of this may show on the branch.
    with parent.pg.connect() as c:
        c.execute("create table parent_only(id int)")
        c.execute("insert into parent_only select generate_series(1, 10000)")
        c.execute("update shared_t set v = 'parent after the branch' where id % 2 = 0")
        c.execute("vacuum shared_t")
    pgbench(parent.pg, "-T", "2", "-c", "2")
    parent_after = parent.record("parent_after")
    parent.wait_ingested(parent.finish_wal())
    parent.stop()

    # The branch, and a primary on it from its full backup at the branch point. The timeline
    # does not know where the record ending there starts (the backup checkpoint's xl_prev): the
    # WAL does.
    prev = prev_record_lsn(parent.archive, branch_point.checkpoint_lsn, branch_point.lsn)
    branch_tl = uuid.uuid4().hex
    info = env.ps.create_timeline(env.tenant_id, branch_tl, ancestor=parent_tl, ancestor_lsn=branch_point.lsn)
    assert info["last_record_lsn"] == branch_point.lsn, info
    child = env.new_primary(branch_tl, branch_point.lsn, "branch", prev_lsn=prev)
    assert child.pg.safe_psql("select count(*) from shared_t where v = 'before the branch'")[0][0] == 5000
    assert child.pg.safe_psql("select count(*) from pg_class where relname = 'parent_only'")[0][0] == 0
    with child.pg.connect() as c:
        c.execute("create table branch_only(id int primary key, v text)")
        c.execute("insert into branch_only select g, md5(g::text) from generate_series(1, 20000) g")
        c.execute("update shared_t set v = 'branch' where id % 3 = 0")
        c.execute("delete from shared_t where id % 5 = 0")
        c.execute("vacuum shared_t")
        c.execute("create index on branch_only(v)")
    pgbench(child.pg, "-T", "2", "-c", "2")
    branch_end = child.record("branch_end")
    child.wait_ingested(child.finish_wal())
    child.stop()

    spliced = test_output_dir / "spliced_wal"
    splice_wal(parent.archive, child.archive, branch_point.lsn, spliced)
    # The branch: at its start it is the parent at the branch point; at its end it has both.
    env.check(branch_tl, parent.base_tar, spliced, branch_point)
    env.check(branch_tl, parent.base_tar, spliced, branch_end)
    # The parent: unchanged by the branch's writes.
    env.check(parent_tl, parent.base_tar, parent.archive, branch_point)
    env.check(parent_tl, parent.base_tar, parent.archive, parent_after)
    env.assert_all_match()


def test_page_oracle_pageserver_kill(daemons, safekeeper_cluster, test_output_dir, port_allocator):
    """kill -9 of the pageserver while it ingests (with small layers, so flushes are frequent),
    then a restart on the same directory: ingest resumes where the durable layers end, and the
    oracle passes at LSNs before, around and after the kill."""
    env = Env(daemons, safekeeper_cluster, test_output_dir, port_allocator, ps_conf="checkpoint_distance = 2097152")
    tl = uuid.uuid4().hex
    start_lsn = env.ps.create_timeline(env.tenant_id, tl)["last_record_lsn"]
    p = env.new_primary(tl, start_lsn, "primary")
    with p.pg.connect() as c:
        c.execute("create table big(id int, v text)")
        c.execute("create index on big(id)")
    before = p.record("before_kill")
    errors: list[BaseException] = []

    def heavy_insert():
        try:
            with p.pg.connect() as c:
                for i in range(10):
                    c.execute("insert into big select g, md5(g::text) from generate_series(%s::int, %s::int) g", (i * 20000 + 1, (i + 1) * 20000))
        except BaseException as e:  # reported by the test thread
            errors.append(e)

    writer = threading.Thread(target=heavy_insert)
    writer.start()
    # Kill it once ingest is well under way (several layers flushed), while WAL still flows.
    first = lsn_int(before.lsn)
    timeline = lambda: env.ps.timeline(env.tenant_id, tl)  # noqa: E731
    deadline = time.monotonic() + 60
    while lsn_int(timeline()["last_record_lsn"]) < first + 8 * 1024 * 1024 and time.monotonic() < deadline:
        time.sleep(0.05)
    at_kill = timeline()
    env.ps.stop(immediate=True)
    time.sleep(1)
    env.ps.start()
    after_restart = timeline()
    during = p.record("after_restart")  # the writer may still be inserting
    writer.join(timeout=300)
    assert not writer.is_alive() and not errors, errors
    print(f"killed at last_record_lsn {at_kill['last_record_lsn']} (disk_consistent {at_kill['disk_consistent_lsn']}); restarted at {after_restart['last_record_lsn']}")
    # A restart resumes from the durable layers: nothing it reported durable is lost.
    assert lsn_int(after_restart["last_record_lsn"]) >= lsn_int(at_kill["disk_consistent_lsn"])
    assert p.pg.safe_psql("select count(*) from big")[0][0] == 200000
    after = p.record("after_kill")
    p.wait_ingested(p.finish_wal())
    p.stop()
    for r in [before, during, after]:
        env.check(tl, p.base_tar, p.archive, r)
    env.assert_all_match()
