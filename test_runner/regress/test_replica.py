"""Hot-standby replicas: a compute that replays the timeline's WAL streamed from the safekeepers
and reads pages it never replayed from the pageserver. It starts at the latest running-xacts
record (a snapshot of the transactions in progress), so it takes queries at once and treats a
transaction open on the primary as in progress until its commit arrives."""

from __future__ import annotations

import time

import psycopg
import pytest

from fixtures.compute import Storage
from fixtures.daemons import wait_until


def test_replica_follows_the_primary(daemons, safekeeper_cluster, test_output_dir, port_allocator):
    storage = Storage(daemons, safekeeper_cluster, test_output_dir, port_allocator)
    primary = storage.compute("primary")
    primary.sql("create table t(id int primary key, v text)")
    primary.sql("insert into t select g, 'v' || g from generate_series(1, 10000) g")

    # A transaction in progress when the replica's snapshot is taken...
    open_tx = primary.connect()
    open_tx.autocommit = False
    open_tx.execute("insert into t select g, 'late' from generate_series(20001, 20100) g")
    primary.sql("checkpoint")  # logs a running-xacts record: where a replica starts

    daemons.allow_errors("cannot execute INSERT in a read-only transaction")
    replica = storage.compute("replica", mode="replica")
    assert replica.sql("select count(*) from t") == [(10000,)]
    assert replica.sql("select pg_is_in_recovery()") == [(True,)]
    with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
        replica.sql("insert into t values (0, 'no')")

    # ...becomes visible on the replica when it commits, not before (and the tuples it saw as
    # in progress were not hinted invalid meanwhile).
    assert replica.sql("select count(*) from t where v = 'late'") == [(0,)]
    open_tx.commit()
    open_tx.close()
    wait_until("the replica to see the late commit", lambda: replica.sql("select count(*) from t where v = 'late'") == [(100,)], timeout_s=30)

    # New writes arrive with bounded lag, including pages the replica never had.
    lags = []
    for i in range(5):
        primary.sql(f"insert into t select g, 'round{i}' from generate_series({30000 + i * 1000}, {30000 + i * 1000 + 999}) g")
        t0 = time.monotonic()
        wait_until("the replica to catch up", lambda: replica.sql(f"select count(*) from t where v = 'round{i}'") == [(1000,)], timeout_s=30, interval_s=0.02)
        lags.append(time.monotonic() - t0)
    primary.sql("update t set v = 'updated' where id <= 5000")
    wait_until("the update on the replica", lambda: replica.sql("select count(*) from t where v = 'updated'") == [(5000,)], timeout_s=30)
    assert replica.sql("select count(*), sum(id) from t") == primary.sql("select count(*), sum(id) from t")
    print(f"replica visibility lag per round (s): {[round(x, 3) for x in lags]}")

    # A restarted replica (new data directory) catches up again.
    replica.stop()
    primary.sql("checkpoint")
    replica2 = storage.compute("replica2", mode="replica")
    primary.sql("insert into t values (99999, 'after replica restart')")
    wait_until("the new replica to see the last insert", lambda: replica2.sql("select v from t where id = 99999") == [("after replica restart",)], timeout_s=30)
    assert replica2.sql("select count(*), sum(id) from t") == primary.sql("select count(*), sum(id) from t")
    replica2.stop()
    primary.stop()
