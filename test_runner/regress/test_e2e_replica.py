"""`neon_local endpoint create --hot-standby`: a replica beside the branch's primary that follows
it (WAL streamed from the safekeepers), read-only, and survives the primary's restart."""

from __future__ import annotations

import time

import psycopg
import pytest

from fixtures.daemons import wait_until
from fixtures.neon_local import neon_env, one, sql, started_env  # noqa: F401


def test_hot_standby_follows_the_primary(started_env):
    nl = started_env
    main = nl.endpoint("main")
    sql(main, "create table t(id int primary key, v text); insert into t select g, 'a' from generate_series(1, 5000) g; checkpoint")
    replica = nl.endpoint("ro", "--hot-standby")
    assert "hot standby" in nl.run("endpoint", "list").stdout
    assert one(replica, "select count(*) from t") == 5000
    assert one(replica, "select pg_is_in_recovery()") is True
    with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
        sql(replica, "insert into t values (0, 'no')")

    sql(main, "insert into t select g, 'b' from generate_series(5001, 6000) g")
    t0 = time.monotonic()
    wait_until("the replica to see the new rows", lambda: one(replica, "select count(*) from t") == 6000, interval_s=0.05)
    print(f"replica saw 1000 new rows {time.monotonic() - t0:.3f} s after the commit")

    # A second replica is fine; a second primary is not.
    nl.endpoint("ro2", "--hot-standby", start=False)
    nl.fails("endpoint", "create", "main2", expect="already has endpoint 'main'")
    nl.fails("endpoint", "create", "bad", "--hot-standby", "--lsn", "0/1000000", expect="takes no --lsn or --timestamp")

    # The replica outlives a restart of the primary and keeps following it.
    nl.run("endpoint", "stop", "main")
    main = nl.start_endpoint("main")
    sql(main, "update t set v = 'c' where id <= 100")
    wait_until("the update on the replica", lambda: one(replica, "select count(*) from t where v = 'c'") == 100, interval_s=0.05)
    assert sql(replica, "select count(*), sum(id) from t") == sql(main, "select count(*), sum(id) from t")
