/*-------------------------------------------------------------------------
 *
 * libpagestore.c
 *	  The pagestream client: one libpq connection to the pageserver per
 *	  backend, opened on first use, `pagestream <tenant> <timeline>`, then one
 *	  request and one response per CopyData (libs/pageserver_api pagestream.rs).
 *
 * Every wait (connect, send, receive) wakes for interrupts; a pageserver
 * that cannot be reached or broke the stream is retried with backoff until
 * neon.pageserver_timeout has passed since the request began, then the
 * query gets an SQL ERROR that names it. A request abandoned by an error
 * (timeout, cancel) leaves its answer in flight, so the connection is
 * dropped and the next request opens a new one. GetPage requests are
 * pipelined (see "Prefetch" below).
 *
 * Errors name the pageserver by host:port, never by the connection string,
 * which may carry a password (DESIGN D9).
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "libpq-fe.h"
#include "libpq/pqformat.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "storage/latch.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"

#include "neon.h"

#define PS_TAG_EXISTS 0
#define PS_TAG_NBLOCKS 1
#define PS_TAG_GETPAGE 2
#define PS_TAG_DBSIZE 3

#define PS_RESP_EXISTS 100
#define PS_RESP_NBLOCKS 101
#define PS_RESP_PAGE 102
#define PS_RESP_ERROR 103
#define PS_RESP_DBSIZE 104

#define PS_RESP_HEADER (1 + 8)

typedef enum
{
	PS_OK,
	PS_BROKEN,					/* connection failed or broke */
	PS_TIMEOUT,
} PsStatus;

static PGconn *ps_conn = NULL;
static bool ps_request_in_flight = false;
static uint64 ps_next_request_id = 1;
static char ps_name[256] = "";	/* host:port, for messages */
static char ps_errmsg[1024] = "";

static void pf_reset(void);

static void
ps_disconnect(void)
{
	if (ps_conn != NULL)
		PQfinish(ps_conn);
	ps_conn = NULL;
	ps_request_in_flight = false;
	pf_reset();
}

static PsStatus
ps_fail(PsStatus st, const char *what)
{
	const char *detail = ps_conn ? PQerrorMessage(ps_conn) : "";
	int			len;

	if (st == PS_TIMEOUT)
		snprintf(ps_errmsg, sizeof(ps_errmsg), "%s: no answer within neon.pageserver_timeout (%d ms)",
				 what, neon_pageserver_timeout_ms);
	else
		snprintf(ps_errmsg, sizeof(ps_errmsg), "%s: %s", what,
				 detail[0] ? detail : "connection closed");
	/* libpq messages span lines: keep ours on one */
	for (char *c = ps_errmsg; *c; c++)
		if (*c == '\n' || *c == '\t')
			*c = ' ';
	len = strlen(ps_errmsg);
	while (len > 0 && (ps_errmsg[len - 1] == '\n' || ps_errmsg[len - 1] == ' '))
		ps_errmsg[--len] = '\0';
	return st;
}

/* Waits for the socket (events) until the deadline; false on timeout. */
static bool
ps_wait(int events, TimestampTz deadline)
{
	for (;;)
	{
		long		timeout_ms = TimestampDifferenceMilliseconds(GetCurrentTimestamp(), deadline);
		int			rc;

		if (timeout_ms <= 0)
			return false;
		rc = WaitLatchOrSocket(MyLatch,
							   WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH | events,
							   PQsocket(ps_conn), timeout_ms, PG_WAIT_EXTENSION);
		if (rc & WL_LATCH_SET)
		{
			ResetLatch(MyLatch);
			CHECK_FOR_INTERRUPTS();
		}
		if (rc & (WL_SOCKET_READABLE | WL_SOCKET_WRITEABLE))
			return true;
	}
}

static PsStatus
ps_connect(TimestampTz deadline)
{
	PostgresPollingStatusType poll = PGRES_POLLING_WRITING;
	PGresult   *res;
	char	   *query;

	if (neon_pageserver_connstring == NULL || neon_pageserver_connstring[0] == '\0')
		ereport(ERROR,
				(errcode(ERRCODE_CONFIG_FILE_ERROR),
				 errmsg("neon.pageserver_connstring is not set: this compute cannot read relation data"),
				 errhint("Set neon.pageserver_connstring, neon.tenant_id and neon.timeline_id in postgresql.conf.")));

	/* until the first answer arrives, an interrupted connection is unusable */
	ps_request_in_flight = true;
	ps_conn = PQconnectStart(neon_pageserver_connstring);
	if (ps_conn == NULL)
		ereport(ERROR, (errcode(ERRCODE_OUT_OF_MEMORY), errmsg("out of memory")));
	snprintf(ps_name, sizeof(ps_name), "%s:%s",
			 PQhost(ps_conn) ? PQhost(ps_conn) : "?", PQport(ps_conn) ? PQport(ps_conn) : "?");
	if (PQstatus(ps_conn) == CONNECTION_BAD)
		return ps_fail(PS_BROKEN, "could not connect");

	while (poll != PGRES_POLLING_OK)
	{
		if (poll == PGRES_POLLING_FAILED)
			return ps_fail(PS_BROKEN, "could not connect");
		if (!ps_wait(poll == PGRES_POLLING_READING ? WL_SOCKET_READABLE : WL_SOCKET_WRITEABLE, deadline))
			return ps_fail(PS_TIMEOUT, "could not connect");
		poll = PQconnectPoll(ps_conn);
	}
	if (PQsetnonblocking(ps_conn, 1) != 0)
		return ps_fail(PS_BROKEN, "could not set up the connection");

	query = psprintf("pagestream %s %s", neon_tenant_id, neon_timeline_id);
	if (!PQsendQuery(ps_conn, query))
	{
		pfree(query);
		return ps_fail(PS_BROKEN, "could not start pagestream");
	}
	pfree(query);
	for (;;)
	{
		int			f = PQflush(ps_conn);

		if (f < 0)
			return ps_fail(PS_BROKEN, "could not start pagestream");
		if (f == 0)
			break;
		if (!ps_wait(WL_SOCKET_WRITEABLE, deadline))
			return ps_fail(PS_TIMEOUT, "could not start pagestream");
		if (!PQconsumeInput(ps_conn))
			return ps_fail(PS_BROKEN, "could not start pagestream");
	}
	while (PQisBusy(ps_conn))
	{
		if (!ps_wait(WL_SOCKET_READABLE, deadline))
			return ps_fail(PS_TIMEOUT, "could not start pagestream");
		if (!PQconsumeInput(ps_conn))
			return ps_fail(PS_BROKEN, "could not start pagestream");
	}
	res = PQgetResult(ps_conn);
	if (res == NULL || PQresultStatus(res) != PGRES_COPY_BOTH)
	{
		snprintf(ps_errmsg, sizeof(ps_errmsg), "pagestream for tenant %s timeline %s refused: %s",
				 neon_tenant_id, neon_timeline_id,
				 res ? PQresultErrorMessage(res) : PQerrorMessage(ps_conn));
		ps_errmsg[strcspn(ps_errmsg, "\n")] = '\0';
		PQclear(res);
		return PS_BROKEN;
	}
	PQclear(res);
	/* connected: requests (pipelined ones included) track their own answers from here */
	ps_request_in_flight = false;
	return PS_OK;
}

/* Sends one request (queued in libpq's buffer, flushed). */
static PsStatus
ps_send(StringInfo req, TimestampTz deadline)
{
	if (PQputCopyData(ps_conn, req->data, req->len) != 1)
		return ps_fail(PS_BROKEN, "could not send request");
	for (;;)
	{
		int			f = PQflush(ps_conn);

		if (f < 0)
			return ps_fail(PS_BROKEN, "could not send request");
		if (f == 0)
			return PS_OK;
		if (!ps_wait(WL_SOCKET_WRITEABLE, deadline))
			return ps_fail(PS_TIMEOUT, "could not send request");
		if (!PQconsumeInput(ps_conn))
			return ps_fail(PS_BROKEN, "could not send request");
	}
}

/* Receives the next answer into *resp (palloc'd). */
static PsStatus
ps_receive(char **resp, int *resp_len, TimestampTz deadline)
{
	char	   *buf = NULL;
	int			n;

	for (;;)
	{
		n = PQgetCopyData(ps_conn, &buf, 1);
		if (n > 0)
			break;
		if (n == 0)
		{
			if (!ps_wait(WL_SOCKET_READABLE, deadline))
				return ps_fail(PS_TIMEOUT, "could not receive answer");
			if (!PQconsumeInput(ps_conn))
				return ps_fail(PS_BROKEN, "could not receive answer");
			continue;
		}
		if (n == -1)
		{
			/* the server ended the stream: take its error, if any */
			PGresult   *res = PQgetResult(ps_conn);

			snprintf(ps_errmsg, sizeof(ps_errmsg), "pagestream ended by the pageserver: %s",
					 res ? PQresultErrorMessage(res) : "no reason given");
			ps_errmsg[strcspn(ps_errmsg, "\n")] = '\0';
			PQclear(res);
			return PS_BROKEN;
		}
		return ps_fail(PS_BROKEN, "could not receive answer");
	}
	*resp = palloc(n);
	memcpy(*resp, buf, n);
	*resp_len = n;
	PQfreemem(buf);
	return PS_OK;
}

/* Sends one request and receives its answer into *resp (palloc'd). */
static PsStatus
ps_exchange(StringInfo req, char **resp, int *resp_len, TimestampTz deadline)
{
	PsStatus	st;

	ps_request_in_flight = true;
	st = ps_send(req, deadline);
	if (st == PS_OK)
		st = ps_receive(resp, resp_len, deadline);
	if (st == PS_OK)
		ps_request_in_flight = false;
	return st;
}

static void
put_reltag(StringInfo b, RelFileNode rnode, ForkNumber forknum)
{
	pq_sendint32(b, rnode.spcNode);
	pq_sendint32(b, rnode.dbNode);
	pq_sendint32(b, rnode.relNode);
	pq_sendbyte(b, (uint8) forknum);
}

/* Starts a pagestream request: tag, request id, LSN; the body follows. */
static void
ps_request_begin(StringInfo req, uint8 tag, uint64 request_id, XLogRecPtr lsn)
{
	initStringInfo(req);
	pq_sendbyte(req, tag);
	pq_sendint64(req, request_id);
	pq_sendint64(req, lsn);
}

/*
 * Prefetch: GetPage requests sent ahead of need, their answers received in
 * request order (the pageserver answers a connection's requests in order).
 * A ring of PS_PREFETCH_MAX entries, by monotonically increasing counters:
 * [pf_head, pf_recv) answered (or consumed), [pf_recv, pf_tail) in flight.
 * Pages at the start LSN never change, so an answer never goes stale: it is
 * kept until read or pushed out by newer prefetches. Any synchronous request
 * first receives every answer in flight; a broken connection empties the ring.
 */
#define PS_PREFETCH_MAX 64

typedef struct PrefetchEntry
{
	RelFileNode rnode;
	ForkNumber	forknum;
	BlockNumber blkno;
	uint64		request_id;
	bool		valid;			/* not consumed yet */
	bool		ok;				/* answered with a page (else: an error) */
	char		page[BLCKSZ];
} PrefetchEntry;

static PrefetchEntry *pf_ring = NULL;
static uint64 pf_head = 0;
static uint64 pf_recv = 0;
static uint64 pf_tail = 0;

#define PF_ENTRY(i) (&pf_ring[(i) % PS_PREFETCH_MAX])

static void
pf_reset(void)
{
	pf_head = pf_recv = pf_tail = 0;
}

/* Receives the answer of the oldest request in flight. */
static PsStatus
pf_receive_one(TimestampTz deadline)
{
	PrefetchEntry *e = PF_ENTRY(pf_recv);
	char	   *resp = NULL;
	int			resp_len = 0;
	PsStatus	st;

	Assert(pf_recv < pf_tail);
	st = ps_receive(&resp, &resp_len, deadline);
	if (st != PS_OK)
		return st;
	if (resp_len < PS_RESP_HEADER || pg_ntoh64(*(uint64 *) (resp + 1)) != e->request_id)
	{
		pfree(resp);
		return ps_fail(PS_BROKEN, "answer out of order for a prefetched page");
	}
	e->ok = ((uint8) resp[0] == PS_RESP_PAGE && resp_len == PS_RESP_HEADER + BLCKSZ);
	if (e->ok)
		memcpy(e->page, resp + PS_RESP_HEADER, BLCKSZ);
	pfree(resp);
	pf_recv++;
	return PS_OK;
}

/* Receives every answer in flight; on failure the connection and the ring are dropped. */
static void
pf_drain(void)
{
	TimestampTz deadline = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), neon_pageserver_timeout_ms);

	while (pf_recv < pf_tail)
	{
		if (pf_receive_one(deadline) != PS_OK)
		{
			ps_disconnect();
			return;
		}
	}
}

static PrefetchEntry *
pf_find(RelFileNode rnode, ForkNumber forknum, BlockNumber blkno, uint64 *index)
{
	for (uint64 i = pf_head; i < pf_tail; i++)
	{
		PrefetchEntry *e = PF_ENTRY(i);

		if (e->valid && e->blkno == blkno && e->forknum == forknum && RelFileNodeEquals(e->rnode, rnode))
		{
			*index = i;
			return e;
		}
	}
	return NULL;
}

static void
pf_forget(PrefetchEntry *e)
{
	e->valid = false;
	while (pf_head < pf_recv && !PF_ENTRY(pf_head)->valid)
		pf_head++;
}

/*
 * Sends a GetPage request for the block unless one is queued already.
 * Best effort: false (nothing sent) when the ring is full of requests in
 * flight or the pageserver cannot be reached now; the read will ask again.
 */
bool
ps_prefetch_page(RelFileNode rnode, ForkNumber forknum, BlockNumber blkno)
{
	uint64		index;
	PrefetchEntry *e;
	StringInfoData req;
	TimestampTz deadline;

	if (pf_find(rnode, forknum, blkno, &index) != NULL)
		return true;
	if (ps_request_in_flight)
		ps_disconnect();		/* an earlier request was abandoned mid-way */
	if (pf_ring == NULL)
		pf_ring = MemoryContextAllocZero(TopMemoryContext, sizeof(PrefetchEntry) * PS_PREFETCH_MAX);
	while (pf_tail - pf_head >= PS_PREFETCH_MAX)
	{
		if (pf_head == pf_recv)
			return false;		/* all in flight */
		PF_ENTRY(pf_head)->valid = false;
		pf_head++;
	}
	deadline = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), neon_pageserver_timeout_ms);
	if (ps_conn == NULL && ps_connect(deadline) != PS_OK)
	{
		ps_disconnect();
		return false;
	}
	e = PF_ENTRY(pf_tail);
	e->rnode = rnode;
	e->forknum = forknum;
	e->blkno = blkno;
	e->request_id = ps_next_request_id++;
	e->valid = true;
	e->ok = false;

	ps_request_begin(&req, PS_TAG_GETPAGE, e->request_id, neon_start_lsn());
	put_reltag(&req, rnode, forknum);
	pq_sendint32(&req, blkno);
	if (ps_send(&req, deadline) != PS_OK)
	{
		pfree(req.data);
		ps_disconnect();
		return false;
	}
	pfree(req.data);
	pf_tail++;
	return true;
}

/*
 * The page of a prefetched block, if its request is queued and answered
 * well; false otherwise (the caller then asks synchronously, which also
 * reports the pageserver's error, if any).
 */
static bool
pf_take_page(RelFileNode rnode, ForkNumber forknum, BlockNumber blkno, char *buffer)
{
	uint64		index;
	PrefetchEntry *e = pf_ring ? pf_find(rnode, forknum, blkno, &index) : NULL;
	TimestampTz deadline;
	bool		ok;

	if (e == NULL)
		return false;
	deadline = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), neon_pageserver_timeout_ms);
	while (pf_recv <= index)
	{
		if (pf_receive_one(deadline) != PS_OK)
		{
			ps_disconnect();
			return false;
		}
	}
	ok = e->ok;
	if (ok)
		memcpy(buffer, e->page, BLCKSZ);
	pf_forget(e);
	return ok;
}

/*
 * Sends the request (tag, body) at LSN lsn and copies the response
 * body of the expected tag, exactly body_len bytes, into out. ERRORs on any
 * failure. Frees what it allocates: reads run in long-lived contexts.
 */
static void
ps_call(uint8 tag, XLogRecPtr lsn, StringInfo body, uint8 resp_tag, char *out, int body_len, const char *what)
{
	uint64		request_id = ps_next_request_id++;
	StringInfoData req;
	char	   *resp = NULL;
	int			resp_len = 0;
	uint64		resp_id;

	ps_request_begin(&req, tag, request_id, lsn);
	appendBinaryStringInfo(&req, body->data, body->len);
	pfree(body->data);

	if (ps_request_in_flight)
		ps_disconnect();		/* an earlier request was abandoned mid-way */
	pf_drain();					/* our answer comes after those in flight */

	/*
	 * A pageserver that restarts (or is briefly unreachable) makes queries
	 * stall, not fail: connection failures and broken streams are retried
	 * with backoff until neon.pageserver_timeout has passed since the
	 * request began; only then does the query get an ERROR.
	 */
	{
		TimestampTz deadline = TimestampTzPlusMilliseconds(GetCurrentTimestamp(),
														   neon_pageserver_timeout_ms);
		long		backoff_ms = 20;
		int			attempts = 0;
		char		last_broken[256] = "";

		for (;;)
		{
			PsStatus	st = PS_OK;

			attempts++;
			if (ps_conn == NULL)
				st = ps_connect(deadline);
			if (st == PS_OK)
				st = ps_exchange(&req, &resp, &resp_len, deadline);
			if (st == PS_OK)
				break;
			ps_disconnect();
			if (st == PS_BROKEN)
				strlcpy(last_broken, ps_errmsg, sizeof(last_broken));
			if (st == PS_BROKEN && GetCurrentTimestamp() < deadline)
			{
				long		left_ms = TimestampDifferenceMilliseconds(GetCurrentTimestamp(), deadline);

				(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
								 Min(backoff_ms, Max(left_ms, 1)), PG_WAIT_EXTENSION);
				ResetLatch(MyLatch);
				CHECK_FOR_INTERRUPTS();
				backoff_ms = Min(backoff_ms * 2, 1000);
				continue;
			}
			ereport(ERROR,
					(errcode(ERRCODE_CONNECTION_FAILURE),
					 errmsg("pageserver at %s (tenant %s, timeline %s) failed to answer %s at LSN %X/%X: %s (%d attempts in %d ms)",
							ps_name, neon_tenant_id, neon_timeline_id, what,
							LSN_FORMAT_ARGS(lsn), ps_errmsg, attempts, neon_pageserver_timeout_ms),
					 /* a timeout hides why the attempts before it failed: say it */
					 (st == PS_TIMEOUT && last_broken[0]) ? errdetail("The attempt before failed with: %s", last_broken) : 0,
					 errhint("Check that the pageserver in neon.pageserver_connstring is running; neon.pageserver_timeout sets how long queries wait for it.")));
		}
	}
	pfree(req.data);

	if (resp_len < PS_RESP_HEADER)
	{
		ps_disconnect();
		ereport(ERROR,
				(errcode(ERRCODE_PROTOCOL_VIOLATION),
				 errmsg("pageserver at %s sent a %d-byte answer to %s, too short for a pagestream response",
						ps_name, resp_len, what)));
	}
	resp_id = pg_ntoh64(*(uint64 *) (resp + 1));
	if (resp_id != request_id)
	{
		ps_disconnect();
		ereport(ERROR,
				(errcode(ERRCODE_PROTOCOL_VIOLATION),
				 errmsg("pageserver at %s answered request %llu while %s (request %llu) was expected",
						ps_name, (unsigned long long) resp_id, what,
						(unsigned long long) request_id)));
	}
	if ((uint8) resp[0] == PS_RESP_ERROR)
	{
		/* the message is NUL-terminated; do not trust that it is */
		char	   *msg = pnstrdup(resp + PS_RESP_HEADER, resp_len - PS_RESP_HEADER);

		ereport(ERROR,
				(errcode(ERRCODE_IO_ERROR),
				 errmsg("pageserver at %s could not answer %s at LSN %X/%X: %s",
						ps_name, what, LSN_FORMAT_ARGS(lsn), msg)));
	}
	if ((uint8) resp[0] != resp_tag || resp_len != PS_RESP_HEADER + body_len)
	{
		ps_disconnect();
		ereport(ERROR,
				(errcode(ERRCODE_PROTOCOL_VIOLATION),
				 errmsg("pageserver at %s answered %s with tag %u and %d bytes, expected tag %u and %d bytes",
						ps_name, what, (uint8) resp[0], resp_len, resp_tag,
						PS_RESP_HEADER + body_len)));
	}
	memcpy(out, resp + PS_RESP_HEADER, body_len);
	pfree(resp);
}


bool
ps_rel_exists(RelFileNode rnode, ForkNumber forknum)
{
	StringInfoData body;
	char		what[128];
	char		r;

	snprintf(what, sizeof(what), "Exists of relation %u/%u/%u fork %d",
			 rnode.spcNode, rnode.dbNode, rnode.relNode, forknum);
	initStringInfo(&body);
	put_reltag(&body, rnode, forknum);
	ps_call(PS_TAG_EXISTS, neon_start_lsn(), &body, PS_RESP_EXISTS, &r, 1, what);
	return r != 0;
}

BlockNumber
ps_rel_nblocks(RelFileNode rnode, ForkNumber forknum)
{
	StringInfoData body;
	char		what[128];
	uint32		n;

	snprintf(what, sizeof(what), "Nblocks of relation %u/%u/%u fork %d",
			 rnode.spcNode, rnode.dbNode, rnode.relNode, forknum);
	initStringInfo(&body);
	put_reltag(&body, rnode, forknum);
	ps_call(PS_TAG_NBLOCKS, neon_start_lsn(), &body, PS_RESP_NBLOCKS, (char *) &n, 4, what);
	return pg_ntoh32(n);
}

void
ps_get_page(RelFileNode rnode, ForkNumber forknum, BlockNumber blkno, char *buffer)
{
	StringInfoData body;
	char		what[160];

	/* Pipelined: queue it (if not yet) behind any prefetches, then wait for it. */
	if (ps_prefetch_page(rnode, forknum, blkno) && pf_take_page(rnode, forknum, blkno, buffer))
		return;
	snprintf(what, sizeof(what), "GetPage of block %u of relation %u/%u/%u fork %d",
			 blkno, rnode.spcNode, rnode.dbNode, rnode.relNode, forknum);
	initStringInfo(&body);
	put_reltag(&body, rnode, forknum);
	pq_sendint32(&body, blkno);
	ps_call(PS_TAG_GETPAGE, neon_start_lsn(), &body, PS_RESP_PAGE, buffer, BLCKSZ, what);
}

int64
ps_db_size(Oid dbnode, XLogRecPtr lsn)
{
	StringInfoData body;
	char		what[64];
	int64		n;

	snprintf(what, sizeof(what), "DbSize of database %u", dbnode);
	initStringInfo(&body);
	pq_sendint32(&body, dbnode);
	ps_call(PS_TAG_DBSIZE, lsn, &body, PS_RESP_DBSIZE, (char *) &n, 8, what);
	return (int64) pg_ntoh64((uint64) n);
}
