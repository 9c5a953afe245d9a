"""The local-page oracle (fixtures/local_page_oracle.py) on primary computes after a mixed
workload: every block a stopped compute holds locally equals the pageserver's page at the final
LSN, except what Postgres changes without WAL (hint bits and the other documented masks).

Two computes in a row on one timeline: the first loads pgbench (every block it holds, it wrote);
the second starts on that data with an empty overlay and runs transactions, updates, deletes,
VACUUM (pruning, freezing, the visibility map, truncation), index builds of every built-in AM,
TOAST, a sequence, an unlogged table and CREATE DATABASE, so it holds a mix of blocks it created,
blocks it read from the pageserver and changed, blocks it only set hint bits on, and holes.
Then the oracle must be able to fail: a flipped data byte in a copy of a local file is reported,
a flipped hint bit is masked."""

from __future__ import annotations

import shutil
import struct

from fixtures.compute import Storage
from fixtures.local_page_oracle import (
    HEAP_XMIN_COMMITTED,
    LocalOracleReport,
    compare_local_pages,
    final_lsn,
    local_rel_files,
    page_type,
)
from fixtures.neon_local import pgbench, pgbench_consistent
from fixtures.pagestream import BLCKSZ, MAIN_FORKNUM, RelTag

SETTINGS = {
    # small: pages are evicted (written locally) and read back during the run
    "shared_buffers": "16MB",
    "allow_in_place_tablespaces": "on",
}
MIN_COMPARED = 5000


def check(rep: LocalOracleReport) -> None:
    print(rep.summary())
    assert not rep.mismatches, rep.summary()
    assert rep.compared >= MIN_COMPARED, rep.summary()
    assert rep.equal_raw + rep.equal_masked == rep.compared


def stop_and_compare(storage: Storage, compute, name: str) -> tuple[LocalOracleReport, str]:
    compute.stop()
    pgdata = compute.workdir / "pgdata"
    lsn = final_lsn(storage.ps, storage.safekeepers, storage.tenant_id, storage.timeline_id, pgdata)
    rep = compare_local_pages(storage.ps, storage.tenant_id, storage.timeline_id, lsn, pgdata, dump_dir=storage.output_dir / f"mismatch_{name}")
    return rep, lsn


def workload(c, connstr: str) -> None:
    # transactions on data the compute has never seen (read from the pageserver)
    pgbench(connstr, "-c", "4", "-j", "2", "-t", "750", "-n")
    pgbench_consistent(connstr)
    c.sql("delete from pgbench_accounts where aid % 50 = 0")
    c.sql("update pgbench_accounts set filler = 'updated' where aid % 97 = 0")
    c.sql("update pgbench_accounts set abalance = abalance + 1 where aid between 1000 and 3000")
    # a rolled-back change: readers then set XMIN_INVALID / XMAX_INVALID hint bits
    with c.connect() as conn:
        conn.execute("begin")
        conn.execute("update pgbench_tellers set tbalance = tbalance + 1000")
        conn.execute("insert into pgbench_history values (1, 1, 1, 1, now(), 'aborted')")
        conn.execute("rollback")
    c.sql("vacuum pgbench_accounts")
    c.sql("vacuum (freeze) pgbench_tellers")
    # index builds (and later inserts into them) of every built-in AM
    c.sql("create index accounts_abalance on pgbench_accounts (abalance)")
    c.sql(
        "create table docs(id serial primary key, k int, doc text, tags text[], pos point, words tsvector)"
    )
    # TOAST: incompressible values well over the 2 kB threshold
    c.sql(
        "insert into docs(k, doc, tags, pos, words) "
        "select g % 100, (select string_agg(md5(random()::text || g || i), '') from generate_series(1, 150) i), "
        "array['t' || (g % 10), 'u' || (g % 7)], point(g % 100, g / 100), to_tsvector('english', 'doc number ' || g || ' of many') "
        "from generate_series(1, 400) g"
    )
    c.sql("create index docs_k_hash on docs using hash (k)")
    c.sql("create index docs_tags_gin on docs using gin (tags)")
    c.sql("create index docs_words_gin on docs using gin (words)")
    c.sql("create index docs_pos_gist on docs using gist (pos)")
    c.sql("create index docs_pos_spgist on docs using spgist (pos)")
    c.sql("create index history_mtime_brin on pgbench_history using brin (mtime)")
    c.sql("insert into docs(k, doc, tags, pos, words) select g % 100, repeat('y', 100), array['v'], point(g, g), to_tsvector('more') from generate_series(401, 2000) g")
    c.sql("update docs set doc = doc || md5(id::text) where id % 3 = 0")
    c.sql("delete from docs where id % 5 = 0")
    # a table VACUUM truncates (the heap, its FSM and VM shrink)
    c.sql("create table shrinking(id int primary key, v text)")
    c.sql("insert into shrinking select g, repeat('s', 200) from generate_series(1, 20000) g")
    c.sql("vacuum shrinking")
    c.sql("delete from shrinking where id > 2000")
    c.sql("vacuum shrinking")
    # an unlogged table: skipped by the oracle (its init fork compared)
    c.sql("create unlogged table scratch(id int primary key, v text)")
    c.sql("insert into scratch select g, 'x' from generate_series(1, 5000) g")
    # a second database (WAL_LOG strategy: every block copied through the WAL) with its own data
    c.sql("create database db2")
    c.sql("create table t2(id int primary key, v text)", "db2")
    c.sql("insert into t2 select g, md5(g::text) from generate_series(1, 20000) g", "db2")
    c.sql("update t2 set v = 'changed' where id % 10 = 0", "db2")
    c.sql("vacuum t2", "db2")
    # more transactions after all that, then readers setting hint bits everywhere
    pgbench(connstr, "-c", "4", "-j", "2", "-t", "250", "-n")  # (the deletes above broke the TPC-B sums)
    c.sql("delete from docs where id % 7 = 0")
    for t in ("pgbench_accounts", "pgbench_tellers", "pgbench_branches", "pgbench_history", "docs", "shrinking"):
        c.sql(f"select count(*) from {t}")
    c.sql("select count(*) from t2", "db2")
    c.sql("select * from docs where k = 42")  # hash index scan: kills dead items
    c.sql("select count(*) from docs where tags @> array['t3']")
    c.sql("checkpoint")


def test_local_pages_match_the_pageserver(daemons, safekeeper_cluster, test_output_dir, port_allocator):
    storage = Storage(daemons, safekeeper_cluster, test_output_dir, port_allocator)

    # 1. A compute that loads pgbench: everything it holds, it wrote.
    c1 = storage.compute("compute1", settings=SETTINGS)
    pgbench(c1.connstr, "-i", "-s", "5", "-q")
    rep1, _ = stop_and_compare(storage, c1, "compute1")
    check(rep1)

    # 2. A compute on that data, with an empty overlay, running the mixed workload.
    c2 = storage.compute("compute2", settings=SETTINGS)
    history_file = c2.sql("select pg_relation_filepath('pgbench_history')")[0][0]
    accounts_file = c2.sql("select pg_relation_filepath('pgbench_accounts')")[0][0]
    workload(c2, c2.connstr)
    rep2, lsn = stop_and_compare(storage, c2, "compute2")
    check(rep2)
    assert rep2.equal_masked > 0 and rep2.masked_by_kind["heap_infomask_hints"] > 0, "the workload set no hint bits: the masks were not exercised"
    assert rep2.skipped["fsm"] > 0 and rep2.skipped["unlogged"] > 0, rep2.summary()

    # 3. The oracle can fail: copies of local files with one byte changed.
    pgdata = c2.workdir / "pgdata"
    rels = local_rel_files(pgdata)

    def rel_of(filepath: str) -> RelTag:
        _, db, node = filepath.split("/")
        return RelTag(1663, int(db), int(node), MAIN_FORKNUM)

    history = rel_of(history_file)
    accounts = rel_of(accounts_file)
    assert history in rels and accounts in rels

    def tampered(rel: RelTag, name: str, change) -> tuple[LocalOracleReport, int]:
        """A pgdata holding only `rel`, whose first suitable block `change` altered in place."""
        fake = test_output_dir / f"tampered_{name}"
        shutil.copytree(pgdata, fake, ignore=shutil.ignore_patterns("base", "global", "pg_tblspc", "pg_wal"))
        d = fake / "base" / str(rel.dbnode)
        d.mkdir(parents=True)
        (fake / "global").mkdir()
        shutil.copy(pgdata / "global" / "pg_control", fake / "global" / "pg_control")
        src = rels[rel][0]
        data = bytearray(src.read_bytes())
        for blkno in range(len(data) // BLCKSZ):
            page = data[blkno * BLCKSZ : (blkno + 1) * BLCKSZ]
            if page_type(bytes(page), MAIN_FORKNUM) == "heap" and change(page):
                data[blkno * BLCKSZ : (blkno + 1) * BLCKSZ] = page
                break
        else:
            raise AssertionError(f"no block of {rel} to tamper with")
        (d / src.name).write_bytes(bytes(data))
        return compare_local_pages(storage.ps, storage.tenant_id, storage.timeline_id, lsn, fake, start_lsn=rep2.start_lsn), blkno

    def first_tuple(page: bytearray) -> int:
        lp = struct.unpack_from("<I", page, 24)[0]
        return lp & 0x7FFF if (lp >> 15) & 3 == 1 else 0

    def flip_data_byte(page: bytearray) -> bool:
        off = first_tuple(page)
        if not off:
            return False
        at = off + page[off + 22] + 4  # t_hoff: the user data; +4: inside the first column
        page[at] ^= 0x01
        flip_data_byte.at = at
        return True

    rep, blkno = tampered(accounts, "data_byte", flip_data_byte)
    print(rep.summary())
    assert len(rep.mismatches) == 1, rep.summary()
    m = rep.mismatches[0]
    assert (m.rel, m.blkno) == (accounts, blkno) and m.offsets == [flip_data_byte.at], m

    def flip_hint_bit(page: bytearray) -> bool:
        off = first_tuple(page)
        if not off:
            return False
        infomask = struct.unpack_from("<H", page, off + 20)[0]
        if infomask & 0x0300 == 0x0300:  # frozen: those bits are not hints
            return False
        struct.pack_into("<H", page, off + 20, infomask ^ HEAP_XMIN_COMMITTED)
        return True

    rep, _ = tampered(history, "hint_bit", flip_hint_bit)
    print(rep.summary())
    assert not rep.mismatches and rep.masked_by_kind["heap_infomask_hints"] >= 1, rep.summary()
