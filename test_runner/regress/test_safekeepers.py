"""Safekeepers and the walproposer with a real Postgres primary (no pageserver): no commit a
client saw acknowledged is ever lost."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
import time
import uuid
from pathlib import Path

import psycopg
import pytest
import requests

from fixtures.daemons import wait_until
from fixtures.osuser import as_pg_user, give_to_pg_user
from fixtures.paths import pg_bin
from fixtures.safekeeper import (
    WALPROPOSER_PG_CONF,
    Walproposer,
    lsn_int,
    lsn_str,
    start_timeline_on,
    sync_safekeepers,
    wait_for_commit_lsn,
)
from fixtures.vanilla_pg import VanillaPostgres


def new_ids():
    return uuid.uuid4().hex, uuid.uuid4().hex


class Ledger:
    """Inserts ids in a loop and remembers which commits were acknowledged."""

    def __init__(self, pg: VanillaPostgres):
        self.pg = pg
        self.acked: list[int] = []
        self.stop = threading.Event()
        self.errors: list[str] = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        next_id = 0
        conn = None
        while not self.stop.is_set():
            try:
                if conn is None:
                    conn = psycopg.connect(self.pg.connstr(), autocommit=True, connect_timeout=5)
                next_id += 1
                conn.execute("insert into ledger values (%s)", (next_id,))
                self.acked.append(next_id)
            except Exception as e:
                self.errors.append(str(e))
                conn = None
                time.sleep(0.2)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *a):
        self.stop.set()
        self.thread.join(timeout=60)


def setup_primary(daemons, safekeeper_cluster, test_output_dir, port_allocator):
    pg = VanillaPostgres(daemons, test_output_dir / "primary" / "pgdata", port_allocator.get())
    daemons.watch_log(pg.log_path)
    pg.initdb(WALPROPOSER_PG_CONF).start()
    tenant_id, timeline_id = new_ids()
    start = start_timeline_on(pg, safekeeper_cluster, tenant_id, timeline_id)
    wp = Walproposer(daemons, pg, safekeeper_cluster, tenant_id, timeline_id).start()
    with pg.connect() as conn:
        conn.execute("create table ledger(id int primary key)")
    return pg, wp, tenant_id, timeline_id, start


def current_lsn(pg) -> str:
    return pg.safe_psql("select pg_current_wal_flush_lsn()::text")[0][0]


def digests_agree(sks, tenant_id, timeline_id, start, until):
    ds = {sk.id: sk.digest(tenant_id, timeline_id, start, until) for sk in sks}
    assert len(set(ds.values())) == 1, f"WAL digests differ in {start}..{until}: {ds}"


def test_commits_survive_kill_of_each_safekeeper(daemons, safekeeper_cluster, test_output_dir, port_allocator):
    pg, wp, tenant_id, timeline_id, start = setup_primary(daemons, safekeeper_cluster, test_output_dir, port_allocator)
    daemons.allow_errors("disconnected", "connection")
    with Ledger(pg) as ledger:
        for sk in safekeeper_cluster:
            wait_until("progress", lambda n=len(ledger.acked): len(ledger.acked) > n + 20, timeout_s=60)
            sk.kill()
            time.sleep(1)
            before = len(ledger.acked)
            wait_until("commits with one safekeeper down", lambda: len(ledger.acked) > before + 20, timeout_s=60)
            sk.start()
        wait_until("progress after restarts", lambda n=len(ledger.acked): len(ledger.acked) > n + 20, timeout_s=60)
    assert ledger.acked, "no commit was acknowledged"
    # Every acknowledged id is in the table, and the WAL that holds them is committed on the safekeepers.
    rows = {r[0] for r in pg.safe_psql("select id from ledger")}
    missing = [i for i in ledger.acked if i not in rows]
    assert not missing, f"acknowledged ids missing: {missing[:10]}"
    lsn = current_lsn(pg)
    wait_for_commit_lsn(safekeeper_cluster, tenant_id, timeline_id, lsn, quorum=3)
    digests_agree(safekeeper_cluster, tenant_id, timeline_id, start, lsn)


def test_majority_down_blocks_commits(daemons, safekeeper_cluster, test_output_dir, port_allocator):
    pg, wp, tenant_id, timeline_id, start = setup_primary(daemons, safekeeper_cluster, test_output_dir, port_allocator)
    daemons.allow_errors("disconnected", "connection")
    pg.safe_psql("insert into ledger values (1)")
    safekeeper_cluster[1].stop()
    safekeeper_cluster[2].stop()
    done = threading.Event()

    def commit():
        with psycopg.connect(pg.connstr(), autocommit=True) as c:
            c.execute("insert into ledger values (2)")
        done.set()

    t = threading.Thread(target=commit, daemon=True)
    t.start()
    time.sleep(5)
    assert not done.is_set(), "a commit was acknowledged with two of three safekeepers down"
    safekeeper_cluster[1].start()
    assert done.wait(timeout=60), "the commit did not complete after a safekeeper came back"
    t.join()
    safekeeper_cluster[2].start()
    assert {r[0] for r in pg.safe_psql("select id from ledger")} == {1, 2}


def test_old_term_tail_is_truncated(daemons, safekeeper_cluster, test_output_dir, port_allocator):
    pg, wp, tenant_id, timeline_id, start = setup_primary(daemons, safekeeper_cluster, test_output_dir, port_allocator)
    daemons.allow_errors("disconnected", "connection", "superseded", "higher than ours", "Postgres", "terminat")
    sk1, sk2, sk3 = safekeeper_cluster
    pg.safe_psql("insert into ledger select generate_series(1, 100)")
    committed = current_lsn(pg)
    wait_for_commit_lsn(safekeeper_cluster, tenant_id, timeline_id, committed, quorum=3)
    # WAL that only sk1 gets: its commit can never be acknowledged.
    sk2.stop()
    sk3.stop()
    def doomed_insert():
        try:
            pg.safe_psql("insert into ledger select generate_series(101, 2000)")
        except Exception:
            pass  # the connection dies with Postgres below

    t = threading.Thread(target=doomed_insert, daemon=True)
    t.start()
    wait_until("sk1 to hold an uncommitted tail", lambda: lsn_int(sk1.timeline_status(tenant_id, timeline_id)["flush_lsn"]) > lsn_int(committed), timeout_s=30)
    wp.stop(immediate=True)
    pg.stop(immediate=True)
    tail_end = sk1.timeline_status(tenant_id, timeline_id)["flush_lsn"]
    # A new term without sk1, then one with everybody: sk1's tail must go.
    sk1.stop()
    sk2.start()
    sk3.start()
    epoch = sync_safekeepers([sk1, sk2, sk3], tenant_id, timeline_id, test_output_dir / "sync1.log")
    assert lsn_int(epoch) < lsn_int(tail_end)
    # With sk3 down, the next election needs sk1's vote, and syncing needs sk1 itself.
    sk3.stop()
    sk1.start()
    epoch2 = sync_safekeepers([sk1, sk2, sk3], tenant_id, timeline_id, test_output_dir / "sync2.log")
    assert epoch2 == epoch, "the second election must keep the term-2 WAL, not sk1's tail"
    assert sk1.timeline_status(tenant_id, timeline_id)["flush_lsn"] == epoch, "sk1's old-term tail was not cut"
    sk3.start()
    for sk in safekeeper_cluster:
        st = sk.timeline_status(tenant_id, timeline_id)
        assert lsn_int(st["commit_lsn"]) <= lsn_int(st["flush_lsn"])
    digests_agree(safekeeper_cluster, tenant_id, timeline_id, start, epoch)


def test_wiped_safekeeper_catches_up(daemons, safekeeper_cluster, test_output_dir, port_allocator):
    pg, wp, tenant_id, timeline_id, start = setup_primary(daemons, safekeeper_cluster, test_output_dir, port_allocator)
    daemons.allow_errors("disconnected", "connection", "not found")
    pg.safe_psql("insert into ledger select generate_series(1, 5000)")
    sk3 = safekeeper_cluster[2]
    sk3.stop()
    shutil.rmtree(sk3.datadir)
    sk3.start()
    sk3.create_timeline(tenant_id, timeline_id, start)
    pg.safe_psql("insert into ledger select generate_series(5001, 10000)")
    lsn = current_lsn(pg)
    wait_for_commit_lsn(safekeeper_cluster, tenant_id, timeline_id, lsn, quorum=3, timeout_s=120)
    digests_agree(safekeeper_cluster, tenant_id, timeline_id, start, lsn)


def test_second_walproposer_takes_over(daemons, safekeeper_cluster, test_output_dir, port_allocator):
    pg, wp, tenant_id, timeline_id, start = setup_primary(daemons, safekeeper_cluster, test_output_dir, port_allocator)
    daemons.allow_errors("higher than ours", "another compute", "superseded", "disconnected", "connection")
    pg.safe_psql("insert into ledger values (1)")
    # A newer proposer (here a sync-safekeepers run) takes a higher term.
    sync_safekeepers(safekeeper_cluster, tenant_id, timeline_id, test_output_dir / "sync.log")
    done = threading.Event()

    def commit():
        try:
            with psycopg.connect(pg.connstr(), autocommit=True) as c:
                c.execute("insert into ledger values (2)")
            done.set()
        except Exception:
            pass

    threading.Thread(target=commit, daemon=True).start()
    # The old walproposer learns of the new term and exits; its commit is never acknowledged.
    wait_until("the old walproposer to exit", lambda: wp.daemon.proc.poll() is not None, timeout_s=30)
    assert wp.daemon.proc.returncode != 0
    assert "another compute" in wp.daemon.log_text()
    assert not done.wait(timeout=3), "the superseded walproposer got a commit acknowledged"


def test_standby_streams_from_safekeeper(daemons, safekeeper_cluster, test_output_dir, port_allocator):
    pg, wp, tenant_id, timeline_id, start = setup_primary(daemons, safekeeper_cluster, test_output_dir, port_allocator)
    pg.safe_psql("insert into ledger select generate_series(1, 1000)")
    standby_dir = test_output_dir / "standby" / "pgdata"
    standby_dir.parent.mkdir(parents=True)
    give_to_pg_user(standby_dir.parent)
    subprocess.run(
        as_pg_user([pg_bin("pg_basebackup"), "-D", standby_dir, "-h", "127.0.0.1", "-p", str(pg.port), "-U", pg.user, "-X", "none", "--no-sync", "-c", "fast"]),
        check=True,
        capture_output=True,
    )
    pg.safe_psql("insert into ledger select generate_series(1001, 2000)")
    standby = VanillaPostgres(daemons, standby_dir, port_allocator.get())
    daemons.watch_log(standby.log_path)
    sk = safekeeper_cluster[0]
    with open(standby_dir / "postgresql.conf", "a") as f:
        f.write(f"\nport = {standby.port}\nsynchronous_standby_names = ''\nhot_standby = on\n")
        f.write(
            f"primary_conninfo = 'host=127.0.0.1 port={sk.pg_port} user=standby "
            f"options=''-c tenant_id={tenant_id} -c timeline_id={timeline_id}'''\n"
        )
    (standby_dir / "standby.signal").touch()
    give_to_pg_user(standby_dir)
    standby.start()
    wait_until("standby to replay all rows", lambda: standby.safe_psql("select count(*) from ledger")[0][0] == 2000, timeout_s=60)
    assert standby.safe_psql("select pg_is_in_recovery()")[0][0] is True


def test_torn_tails_recover(daemons, safekeeper_cluster, test_output_dir, port_allocator):
    pg, wp, tenant_id, timeline_id, start = setup_primary(daemons, safekeeper_cluster, test_output_dir, port_allocator)
    daemons.allow_errors("disconnected", "connection", "cut", "torn")
    pg.safe_psql("insert into ledger select generate_series(1, 3000)")
    lsn = current_lsn(pg)
    wait_for_commit_lsn(safekeeper_cluster, tenant_id, timeline_id, lsn, quorum=3)
    wp.stop()
    statuses = [sk.timeline_status(tenant_id, timeline_id) for sk in safekeeper_cluster]
    for sk in safekeeper_cluster:
        sk.stop(immediate=True)
    tl_dirs = [sk.datadir / tenant_id / timeline_id for sk in safekeeper_cluster]
    partials = [sorted(d.glob("*.partial"))[-1] for d in tl_dirs]
    # sk1: garbage after its WAL end (a half-written record); sk2: the file cut short in the
    # middle of its last records (lost unsynced writes); sk3 left alone.
    seg = 16 * 1024 * 1024
    end1 = lsn_int(statuses[0]["flush_lsn"]) % seg
    with open(partials[0], "r+b") as f:
        f.seek(end1)
        f.write(os.urandom(3000))
    end2 = lsn_int(statuses[1]["flush_lsn"]) % seg
    with open(partials[1], "r+b") as f:
        f.truncate(end2 - 100)
    for sk in safekeeper_cluster:
        sk.start()
    # What each found on disk at start (sk2 may already have pulled the rest from a peer).
    def found_end(sk) -> int:
        m = re.findall(r"ends at ([0-9A-F]+/[0-9A-F]+)", sk.daemon.log_text())
        assert m, f"safekeeper {sk.id} logged no WAL end"
        return lsn_int(m[-1])

    assert found_end(safekeeper_cluster[0]) == lsn_int(statuses[0]["flush_lsn"]), "garbage after the WAL end must be cut, not served"
    assert found_end(safekeeper_cluster[1]) < lsn_int(statuses[1]["flush_lsn"]), "a torn record must not count"
    assert found_end(safekeeper_cluster[2]) == lsn_int(statuses[2]["flush_lsn"])
    # Peer recovery brings sk2 back to what the others committed.
    wait_until(
        "sk2 to recover from its peers",
        lambda: safekeeper_cluster[1].timeline_status(tenant_id, timeline_id)["flush_lsn"] == statuses[2]["flush_lsn"],
        timeout_s=30,
    )
    # A new walproposer continues; sk2 catches up from its peers.
    wp2 = Walproposer(daemons, pg, safekeeper_cluster, tenant_id, timeline_id, name="walproposer2").start()
    pg.safe_psql("insert into ledger select generate_series(3001, 4000)")
    lsn2 = current_lsn(pg)
    wait_for_commit_lsn(safekeeper_cluster, tenant_id, timeline_id, lsn2, quorum=3, timeout_s=60)
    digests_agree(safekeeper_cluster, tenant_id, timeline_id, start, lsn2)
    assert pg.safe_psql("select count(*) from ledger")[0][0] == 4000
    wp2.stop()


def test_bad_proposer_messages_change_nothing(daemons, safekeeper_cluster, test_output_dir, port_allocator):
    """Malformed, out-of-order and wrong-term messages over the wire get a protocol error;
    the timeline's state and WAL stay exactly as they were."""
    import struct

    from fixtures.pq_raw import RawPq

    pg, wp, tenant_id, timeline_id, start = setup_primary(daemons, safekeeper_cluster, test_output_dir, port_allocator)
    pg.safe_psql("insert into ledger select generate_series(1, 100)")
    lsn = current_lsn(pg)
    wait_for_commit_lsn(safekeeper_cluster, tenant_id, timeline_id, lsn, quorum=3)
    wp.stop()
    daemons.allow_errors("refusing proposer message", "bad proposer message")
    sk = safekeeper_cluster[0]
    before = sk.timeline_status(tenant_id, timeline_id)
    digest_before = sk.digest(tenant_id, timeline_id, start, before["flush_lsn"])
    term = before["term"]
    flush = lsn_int(before["flush_lsn"])
    q = lambda *v: b"".join(struct.pack("!Q", x) for x in v)  # noqa: E731
    bad = {
        "garbage": b"\xff\x00\x01",
        "truncated vote": b"v" + struct.pack("!I", 7),
        "append of a term never elected": b"a" + q(term + 5, flush, flush + 3, 0, 0) + b"abc",
        "append of an older term": b"a" + q(max(term - 1, 0), flush, flush + 3, 0, 0) + b"abc",
        "append with a gap": b"a" + q(term, flush + 100, flush + 103, 0, 0) + b"abc",
        "elected below commit": b"e" + q(term + 9, lsn_int(start), lsn_int(start)) + struct.pack("!I", 1) + q(term + 9, lsn_int(start)),
        "length mismatch": b"a" + q(term, flush, flush + 10, 0, 0) + b"abc",
    }
    params = {"user": "test", "options": f"-c tenant_id={tenant_id} -c timeline_id={timeline_id}"}
    outcomes = {}
    for name, msg in bad.items():
        c = RawPq(sk.pg_port, params)
        c.query("START_WAL_PUSH")
        tag, _ = c.read_until_error_or({b"W"})
        assert tag == b"W", f"{name}: no COPY BOTH"
        c.copy_data(msg)
        tag, payload = c.read_until_error_or({b"d"})
        outcomes[name] = tag
        c.close()
        after = sk.timeline_status(tenant_id, timeline_id)
        # An older term's append is answered (with our higher term) rather than refused; either
        # way nothing may change.
        if name != "append of an older term":
            assert tag == b"E", f"{name}: expected a protocol error, got {tag!r} {payload!r}"
        for k in ["term", "term_history", "flush_lsn", "commit_lsn"]:
            assert after[k] == before[k], f"{name} changed {k}: {before[k]} -> {after[k]}"
        assert sk.digest(tenant_id, timeline_id, start, before["flush_lsn"]) == digest_before, f"{name} changed WAL"
    assert outcomes["append of an older term"] in (b"d", b"E")
