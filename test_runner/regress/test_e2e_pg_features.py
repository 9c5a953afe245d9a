"""Postgres features on the stack, through neon_local: each survives a compute restart (a fresh
data directory from the pageserver) and a branch."""

from __future__ import annotations

import threading

import psycopg
import pytest

from fixtures.neon_local import connect, neon_env, one, sql, started_env  # noqa: F401


def _restart(nl, name: str, mode: str = "fast") -> str:
    nl.run("endpoint", "stop", name, "--mode", mode)
    return nl.start_endpoint(name)


def test_createdb_dropdb_with_branches(started_env):
    nl = started_env
    main = nl.endpoint("main")
    sql(main, "create database db1")
    with pytest.raises(psycopg.errors.FeatureNotSupported, match="STRATEGY FILE_COPY is not supported"):
        sql(main, "create database db_fc strategy file_copy")
    sql(main, "create database db_fc")
    for db in ["db1", "db_fc"]:
        sql(main, f"create table t(a int); insert into t select generate_series(1, 100)", dbname=db)
    nl.branch("before_drop")
    sql(main, "drop database db1")
    sql(main, "create database db2 template db_fc")
    sql(main, "insert into t select generate_series(1, 50)", dbname="db2")
    nl.branch("after_drop")

    dbs = lambda c: {r[0] for r in sql(c, "select datname from pg_database where not datistemplate")}  # noqa: E731
    before = nl.endpoint("before", "--branch-name", "before_drop")
    assert dbs(before) == {"postgres", "db1", "db_fc"}
    assert one(before, "select count(*) from t", dbname="db1") == 100
    after = nl.endpoint("after", "--branch-name", "after_drop")
    assert dbs(after) == {"postgres", "db_fc", "db2"}
    assert one(after, "select count(*) from t", dbname="db2") == 150
    # Each branch creates and drops databases on its own.
    sql(before, "drop database db1")
    sql(before, "create database db3")
    sql(before, "create table x(a int); insert into x values (1)", dbname="db3")
    main = _restart(nl, "main")
    assert dbs(main) == {"postgres", "db_fc", "db2"}
    assert one(main, "select count(*) from t", dbname="db_fc") == 100
    before = _restart(nl, "before")
    assert dbs(before) == {"postgres", "db_fc", "db3"}
    assert one(before, "select a from x", dbname="db3") == 1
    # The dropped database's files are gone from a fresh compute, and its name is reusable.
    sql(main, "create database db1")
    assert one(main, "select count(*) from pg_class where relname = 't'", dbname="db1") == 0


INDEXED_UNLOGGED = """
create unlogged table u(id int, p point, arr int[], r int4range, words tsvector);
create index u_btree on u using btree(id);
create index u_hash on u using hash(id);
create index u_gist on u using gist(r);
create index u_gin on u using gin(arr);
create index u_spgist on u using spgist(p);
create index u_brin on u using brin(id);
create index u_gin_words on u using gin(words);
"""

FILL_UNLOGGED = """
insert into u select g, point(g, g), array[g, g + 1], int4range(g, g + 10), to_tsvector('simple', 'w' || g)
from generate_series(1, 2000) g
"""

INDEX_QUERIES = {
    "u_btree": ("select count(*) from u where id between 100 and 199", 100),
    "u_hash": ("select count(*) from u where id = 777", 1),
    "u_gist": ("select count(*) from u where r @> 1005", 10),
    "u_gin": ("select count(*) from u where arr @> array[1500]", 2),
    "u_spgist": ("select count(*) from u where p <@ box(point(10, 10), point(19, 19))", 10),
    "u_brin": ("select count(*) from u where id between 1991 and 2000", 10),
    "u_gin_words": ("select count(*) from u where words @@ 'w42'::tsquery", 1),
}


def _check_indexes(connstr: str, filled: bool) -> None:
    """Each query answered through its index alone: the others are dropped in a transaction
    that is rolled back."""
    with connect(connstr, autocommit=False) as c:
        for index, (q, n) in INDEX_QUERIES.items():
            c.execute("set local enable_seqscan = off")
            others = [i for i in INDEX_QUERIES if i != index]
            c.execute(f"drop index {', '.join(others)}")
            plan = "\n".join(r[0] for r in c.execute("explain " + q).fetchall())
            assert index in plan, f"{q} does not use {index}:\n{plan}"
            got = c.execute(q).fetchone()[0]
            assert got == (n if filled else 0), f"{index}: {q} gave {got}"
            c.rollback()


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_unlogged_tables_with_every_index_type(started_env, mode):
    nl = started_env
    main = nl.endpoint("main")
    sql(main, "create extension amcheck")
    sql(main, INDEXED_UNLOGGED)
    sql(main, FILL_UNLOGGED)
    _check_indexes(main, filled=True)
    # Unlogged data lives in the compute only: a new compute starts with empty tables (as stock
    # Postgres after a crash), whose indexes work.
    main = _restart(nl, "main", mode)
    assert one(main, "select count(*) from u") == 0
    _check_indexes(main, filled=False)
    sql(main, FILL_UNLOGGED)
    _check_indexes(main, filled=True)
    sql(main, "select bt_index_check('u_btree', true)")
    # On a branch, too.
    nl.branch("dev")
    dev = nl.endpoint("dev", "--branch-name", "dev")
    assert one(dev, "select count(*) from u") == 0
    sql(dev, FILL_UNLOGGED)
    _check_indexes(dev, filled=True)


def test_logged_table_with_every_index_type(started_env):
    """The same indexes on a logged table: built from WAL by the pageserver, they answer the
    same on a new compute and on a branch, and take more writes (page splits, GIN pending list)."""
    nl = started_env
    main = nl.endpoint("main")
    sql(main, "create extension amcheck")
    sql(main, INDEXED_UNLOGGED.replace("create unlogged table", "create table"))
    sql(main, FILL_UNLOGGED)
    sql(main, "delete from u where id % 7 = 0")
    sql(main, "vacuum u")
    sql(main, FILL_UNLOGGED.replace("generate_series(1, 2000) g", "generate_series(1, 2000) g where g % 7 = 0"))
    _check_indexes(main, filled=True)
    nl.branch("dev")
    main = _restart(nl, "main", "immediate")
    dev = nl.endpoint("dev", "--branch-name", "dev")
    for c in [main, dev]:
        _check_indexes(c, filled=True)
        sql(c, "select bt_index_check('u_btree', true)")
        sql(c, FILL_UNLOGGED.replace("generate_series(1, 2000)", "generate_series(2001, 4000)"))
        assert one(c, "select count(*) from u where id > 2000") == 2000
        _check_indexes(c, filled=True)  # the first 2000 rows' answers are unchanged


def test_sequences_on_a_branch(started_env):
    nl = started_env
    main = nl.endpoint("main")
    sql(main, "create sequence s; create table ids(id bigint generated always as identity, v int)")
    handed = [one(main, "select nextval('s')") for _ in range(40)]
    sql(main, "insert into ids(v) select generate_series(1, 10)")
    nl.branch("dev")
    after_branch_main = [one(main, "select nextval('s')") for _ in range(5)]
    dev = nl.endpoint("dev", "--branch-name", "dev")
    on_branch = [one(dev, "select nextval('s')") for _ in range(5)]
    assert min(on_branch) > max(handed), "a branch never hands out a value its parent handed out before"
    assert on_branch == sorted(on_branch) and len(set(on_branch)) == 5
    sql(dev, "insert into ids(v) values (11)")
    assert one(dev, "select max(id) from ids") > 10
    sql(dev, "select setval('s', 1000000)")
    assert one(dev, "select nextval('s')") == 1000001
    main = _restart(nl, "main", "immediate")
    nxt = one(main, "select nextval('s')")
    assert nxt > max(after_branch_main) and nxt < 1000000, "the branch's setval does not reach main"
    assert one(main, "select count(*) from ids") == 10


def test_10k_subtransactions_then_branch(started_env):
    nl = started_env
    main = nl.endpoint("main")
    sql(main, "create table sub(i int)")
    # One transaction, 10,000 subtransactions; every 10th rolls back.
    sql(
        main,
        """do $$ begin
            for i in 1..10000 loop
                begin
                    insert into sub values (i);
                    if i % 10 = 0 then raise exception 'roll back %', i; end if;
                exception when raise_exception then null;
                end;
            end loop;
        end $$""",
    )
    assert one(main, "select count(*) from sub") == 9000
    nl.branch("dev")
    dev = nl.endpoint("dev", "--branch-name", "dev")
    assert one(dev, "select count(*), sum(i) from sub") == 9000
    assert sql(dev, "select count(*), sum(i) from sub")[0] == (9000, 50005000 - 10 * 500500)
    assert one(dev, "select count(*) from sub where i % 10 = 0") == 0
    main = _restart(nl, "main", "immediate")
    assert sql(main, "select count(*), sum(i) from sub")[0] == (9000, 50005000 - 10 * 500500)


def test_multixacts_then_branch_and_restart(started_env):
    nl = started_env
    main = nl.endpoint("main")
    sql(main, "create table mx(id int primary key, v int); insert into mx select g, 0 from generate_series(1, 100) g")
    lockers = [connect(main, autocommit=False) for _ in range(5)]
    try:
        for c in lockers:
            c.execute("select * from mx for key share")
        # A no-key-update locker beside the key-share lockers on the first ten rows.
        updater = connect(main, autocommit=False)
        lockers.append(updater)
        updater.execute("select * from mx where id <= 10 for no key update")
        for i, c in enumerate(lockers):
            if i % 2:
                c.rollback()
            else:
                c.commit()
    finally:
        for c in lockers:
            c.close()
    rows = sql(main, "select id, xmax::text::bigint from mx where id in (1, 50) order by id")
    members = {
        rid: sorted(r[1] for r in sql(main, f"select * from pg_get_multixact_members('{xmax}')"))
        for rid, xmax in rows
    }
    assert members[1] == ["fornokeyupd"] + ["keysh"] * 5 and members[50] == ["keysh"] * 5, members
    sql(main, "checkpoint")
    nl.branch("dev")
    dev = nl.endpoint("dev", "--branch-name", "dev")
    main = _restart(nl, "main", "immediate")
    for connstr in [dev, main]:
        for rid, xmax in rows:
            got = sorted(r[1] for r in sql(connstr, f"select * from pg_get_multixact_members('{xmax}')"))
            assert got == members[rid]
        assert sql(connstr, "select sum(v), count(*) from mx")[0] == (0, 100)
        # New multixacts and updates over the old ones work.
        with connect(connstr, autocommit=False) as a, connect(connstr, autocommit=False) as b:
            a.execute("select * from mx where id <= 20 for key share")
            b.execute("select * from mx where id <= 20 for key share")
            a.commit()
            b.commit()
        sql(connstr, "update mx set v = v + 1")
        assert sql(connstr, "select sum(v) from mx")[0][0] == 100


def test_prepared_transactions_into_a_branch(started_env):
    nl = started_env
    main = nl.endpoint("main")
    assert int(one(main, "show max_prepared_transactions")) > 0, "neon_local enables two-phase commit"
    sql(main, "create table p(a int)")
    for gid, val in [("gx1", 1), ("gx2", 2), ("gx3", 3)]:
        with connect(main, autocommit=False) as c:
            c.execute(f"insert into p values ({val})")
            c.execute(f"prepare transaction '{gid}'")
    nl.branch("dev")
    dev = nl.endpoint("dev", "--branch-name", "dev")
    assert {r[0] for r in sql(dev, "select gid from pg_prepared_xacts")} == {"gx1", "gx2", "gx3"}
    assert one(dev, "select count(*) from p") == 0
    sql(dev, "commit prepared 'gx1'")
    sql(dev, "rollback prepared 'gx2'")
    assert [r[0] for r in sql(dev, "select a from p")] == [1]
    dev = _restart(nl, "dev", "immediate")
    assert [r[0] for r in sql(dev, "select gid from pg_prepared_xacts")] == ["gx3"]
    sql(dev, "commit prepared 'gx3'")
    assert sorted(r[0] for r in sql(dev, "select a from p")) == [1, 3]
    # Main still holds all three, and decides differently.
    main = _restart(nl, "main")
    assert {r[0] for r in sql(main, "select gid from pg_prepared_xacts")} == {"gx1", "gx2", "gx3"}
    sql(main, "rollback prepared 'gx1'")
    sql(main, "commit prepared 'gx2'")
    sql(main, "commit prepared 'gx3'")
    assert sorted(r[0] for r in sql(main, "select a from p")) == [2, 3]


def _burn_xids(connstr: str, n: int) -> None:
    """Consumes `n` xids, each in its own committed transaction (asynchronous commit: the loop
    does not wait for the safekeepers per transaction)."""
    with connect(connstr) as c:
        c.execute("set synchronous_commit = off")
        c.execute(
            f"""do $$ begin
                for i in 1..{n} loop perform pg_current_xact_id(); commit; end loop;
            end $$"""
        )


def _freeze_all(connstr: str) -> None:
    sql(connstr, "update pg_database set datallowconn = true where datname = 'template0'")
    for db in ["template0", "template1", "postgres"]:
        with connect(connstr, dbname=db) as c:
            c.execute("vacuum freeze")
    sql(connstr, "update pg_database set datallowconn = false where datname = 'template0'")


def _xid_horizon_checks(main: str, n: int) -> None:
    sql(main, "create table xt(a int); insert into xt select generate_series(1, 1000)")
    first = int(one(main, "select pg_current_xact_id()::text"))
    _burn_xids(main, n)
    last = int(one(main, "select pg_current_xact_id()::text"))
    assert last - first >= n
    _freeze_all(main)
    sql(main, "checkpoint")
    ages = sql(main, "select datname, age(datfrozenxid) from pg_database")
    assert all(age < n // 2 for _, age in ages), f"VACUUM FREEZE left old xids: {ages}"


def test_clog_truncation_after_vacuum_freeze(started_env):
    """More than one clog segment (1M xids) frozen away in every database: Postgres truncates
    pg_xact, and a new compute and a branch (whose pg_xact comes from the pageserver) still
    read and write."""
    nl = started_env
    main = nl.endpoint("main")
    _xid_horizon_checks(main, 1_100_000)
    pg_xact = nl.repo_dir / "endpoints" / "main" / "pgdata" / "pg_xact"
    assert "0000" not in {p.name for p in pg_xact.iterdir()}, "VACUUM FREEZE truncated the first clog segment"
    nl.branch("dev")
    main = _restart(nl, "main", "immediate")
    assert "0000" not in {p.name for p in pg_xact.iterdir()}, "the pageserver's backup follows the truncation"
    dev = nl.endpoint("dev", "--branch-name", "dev")
    for connstr in [main, dev]:
        assert one(connstr, "select count(*) from xt") == 1000
        sql(connstr, "update xt set a = a + 1")
        assert one(connstr, "select sum(a) from xt") == 500500 + 1000
        assert one(connstr, "select count(*) from pg_class") > 0


def test_table_larger_than_shared_buffers(started_env):
    nl = started_env
    main = nl.endpoint("main", "-c", "shared_buffers=16MB")
    assert one(main, "show shared_buffers") == "16MB"
    sql(main, "create table big(id int, pad text) with (fillfactor = 100)")
    sql(main, "insert into big select g, repeat(md5(g::text), 4) from generate_series(1, 500000) g")
    size = one(main, "select pg_relation_size('big')")
    assert size > 4 * 16 * 1024 * 1024, f"table is {size} bytes"
    expect = sql(main, "select count(*), sum(id), sum(length(pad)) from big")[0]
    assert expect == (500000, 500000 * 500001 // 2, 500000 * 128)
    sql(main, "update big set id = id + 1 where id % 1000 = 0")
    expect = sql(main, "select count(*), sum(id), md5(string_agg(pad, '' order by id)) from big")[0]
    main = _restart(nl, "main", "immediate")
    assert sql(main, "select count(*), sum(id), md5(string_agg(pad, '' order by id)) from big")[0] == expect


def test_toast_values_of_1mb(started_env):
    nl = started_env
    main = nl.endpoint("main")
    sql(main, "create table toast(id int primary key, v text, b bytea)")
    # Incompressible text (md5 hex) and bytea, 1 MiB each, stored out of line.
    sql(
        main,
        """insert into toast select g,
             (select string_agg(md5(g::text || i::text), '') from generate_series(1, 32768) i),
             (select string_agg(decode(md5(i::text || g::text), 'hex'), ''::bytea) from generate_series(1, 65536) i)
           from generate_series(1, 5) g""",
    )
    q = "select id, length(v), length(b), md5(v), md5(b) from toast order by id"
    expect = sql(main, q)
    assert all(r[1] == 1 << 20 and r[2] == 1 << 20 for r in expect)
    assert one(main, "select pg_relation_size(reltoastrelid) from pg_class where relname = 'toast'") > 5 << 20
    main = _restart(nl, "main", "immediate")
    assert sql(main, q) == expect
    nl.branch("dev")
    dev = nl.endpoint("dev", "--branch-name", "dev")
    assert sql(dev, q) == expect
    sql(dev, "update toast set v = reverse(v) where id = 1")
    assert sql(main, q) == expect, "a branch's TOAST update does not reach main"
    assert one(dev, "select md5(reverse(v)) from toast where id = 1") == expect[0][3]
