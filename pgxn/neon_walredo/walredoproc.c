/*-------------------------------------------------------------------------
 *
 * walredoproc.c
 *	  `postgres --wal-redo`: the pageserver's WAL redo process.
 *
 * The pageserver stores WAL records per block and asks this process to
 * apply them: it sends a target block, optionally its base image, the
 * records, and reads back the resulting page. The process is a stripped-down
 * standalone backend: no postmaster, no data directory, process-local
 * "shared" memory (fake_shmem.c), a tiny buffer pool and an in-memory
 * storage manager in which only the target block exists (inmem_smgr.c).
 * Records are decoded with Postgres's own DecodeXLogRecord() and applied
 * with the resource manager's rm_redo(), exactly as the startup process
 * does, with the core hook redo_read_buffer_filter making redo skip every
 * block reference but the target.
 *
 * The pipe protocol is documented in README.md. Errors are reported on
 * stderr and end the process with a non-zero status (ERROR is promoted to
 * FATAL because there is no error recovery loop); the pageserver starts a
 * new process for the next request.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <sys/resource.h>
#include <unistd.h>

#include "access/xlog.h"
#include "access/xlog_internal.h"
#include "access/xlogreader.h"
#include "access/xlogrecord.h"
#include "access/xlogrecovery.h"
#include "access/xlogutils.h"
#include "fmgr.h"
#include "libpq/pqsignal.h"
#include "miscadmin.h"
#include "port/pg_bswap.h"
#include "port/pg_crc32c.h"
#include "storage/buf_internals.h"
#include "storage/bufmgr.h"
#include "storage/fd.h"
#include "storage/ipc.h"
#include "storage/proc.h"
#include "storage/smgr.h"
#include "tcop/dest.h"
#include "tcop/tcopprot.h"
#include "utils/guc.h"
#include "utils/memutils.h"
#include "utils/resowner.h"
#include "utils/timestamp.h"

#include "neon_walredo.h"

PG_MODULE_MAGIC;

PGDLLEXPORT void WalRedoMain(int argc, char *argv[]);

/* Buffers of the redo process: a request touches one block plus scratch. */
#define WAL_REDO_SHARED_BUFFERS "32"

/* Sizes on the wire (README.md). */
#define BUFFER_TAG_SIZE_BYTES 17
#define LENGTH_FIELD_SIZE_BYTES 4
#define APPLY_HEADER_SIZE_BYTES 8
/*
 * The largest record we accept: Postgres 16's XLogRecordMaxSize (15 has no
 * such limit but never writes records near it). Keeps every allocation
 * below MaxAllocSize.
 */
#define RECORD_SIZE_BYTES_MAX (1020 * 1024 * 1024)
/* The largest message: an 'A' with the largest record. */
#define MESSAGE_PAYLOAD_SIZE_BYTES_MAX (APPLY_HEADER_SIZE_BYTES + RECORD_SIZE_BYTES_MAX)

/* Where the answers go: the original stdout. fd 1 itself points at stderr. */
static int	protocol_out_fd = -1;

/* The block being reconstructed (after 'B'). */
static bool target_valid = false;
static RelFileNode target_rnode;
static ForkNumber target_forknum;
static BlockNumber target_blkno;
/* 'P' is only accepted right after 'B', before any record changed the block. */
static bool base_page_allowed = false;

static XLogReaderState *reader_state;

/* For the error context of 'A'. */
static XLogRecPtr applying_end_lsn = InvalidXLogRecPtr;

static void wal_redo_init(void);
static int	read_message(StringInfo msg);
static void handle_begin(StringInfo msg);
static void handle_push_page(StringInfo msg);
static void handle_apply(StringInfo msg);
static void handle_get_page(StringInfo msg);
static void write_answer(const char *data, size_t len);
static void drop_all_buffers(void);
static bool redo_block_filter(XLogReaderState *record, uint8 block_id);
static void apply_error_callback(void *arg);

/*
 * Entry point, called by main() of our patched Postgres for `--wal-redo`
 * after InitStandaloneProcess().
 */
void
WalRedoMain(int argc, char *argv[])
{
	StringInfoData msg;

	wal_redo_init();

	MemoryContextSwitchTo(MessageContext);
	for (;;)
	{
		int			tag;

		MemoryContextReset(MessageContext);
		initStringInfo(&msg);

		tag = read_message(&msg);
		switch (tag)
		{
			case 'B':
				handle_begin(&msg);
				break;
			case 'P':
				handle_push_page(&msg);
				break;
			case 'A':
				handle_apply(&msg);
				break;
			case 'G':
				handle_get_page(&msg);
				break;
			case 'H':
				if (msg.len != 0)
					ereport(FATAL,
							(errcode(ERRCODE_PROTOCOL_VIOLATION),
							 errmsg("wal-redo: ping message carries %d bytes, expected none", msg.len)));
				write_answer("H", 1);
				break;
			case EOF:
				/* The pageserver closed our stdin: a normal shutdown. */
				proc_exit(0);
				break;
			default:
				ereport(FATAL,
						(errcode(ERRCODE_PROTOCOL_VIOLATION),
						 errmsg("wal-redo: unknown message tag 0x%02x", tag)));
		}
	}
}

/*
 * Brings up just enough of a backend to run redo routines: GUCs, process-local
 * shared memory, a PGPROC (LWLocks, relation extension locks), the buffer
 * manager over the in-memory smgr, a resource owner for buffer pins, the
 * resource managers' private state, and a WAL reader to decode records with.
 */
static void
wal_redo_init(void)
{
	struct rlimit no_core = {0, 0};

	/*
	 * stdout carries page images. Anything else Postgres might print there
	 * goes to stderr instead, so it can never corrupt the protocol.
	 */
	protocol_out_fd = dup(STDOUT_FILENO);
	if (protocol_out_fd < 0 || dup2(STDERR_FILENO, STDOUT_FILENO) < 0)
	{
		write_stderr("wal-redo: could not set up stdout: %m\n");
		exit(1);
	}

	/* A PANIC in a redo routine aborts; a core file per bad record helps nobody. */
	(void) setrlimit(RLIMIT_CORE, &no_core);

	/* SIGTERM and SIGPIPE keep their default action: end the process. */
	PG_SETMASK(&UnBlockSig);

	whereToSendOutput = DestNone;
	smgr_hook = inmem_smgr_hook;

	InitializeGUCOptions();
	SetConfigOption("shared_buffers", WAL_REDO_SHARED_BUFFERS, PGC_POSTMASTER, PGC_S_ARGV);
	SetConfigOption("max_connections", "1", PGC_POSTMASTER, PGC_S_ARGV);
	SetConfigOption("max_worker_processes", "0", PGC_POSTMASTER, PGC_S_ARGV);
	SetConfigOption("max_wal_senders", "0", PGC_POSTMASTER, PGC_S_ARGV);
	SetConfigOption("max_replication_slots", "0", PGC_POSTMASTER, PGC_S_ARGV);
	SetConfigOption("max_prepared_transactions", "0", PGC_POSTMASTER, PGC_S_ARGV);
	SetConfigOption("huge_pages", "off", PGC_POSTMASTER, PGC_S_ARGV);
	InitializeMaxBackends();

	CreateFakeSharedMemoryAndSemaphores();
	PgStartTime = GetCurrentTimestamp();

	InitAuxiliaryProcess();
	InitFileAccess();
	smgrinit();
	InitBufferPoolAccess();
	CreateAuxProcessResourceOwner();

	SetProcessingMode(NormalProcessing);

	/*
	 * Redo routines only work "in recovery". A reference to a page that does
	 * not exist or is all zeros (a record without its base image) is an
	 * error, not something a later record will fix: we are consistent.
	 */
	InRecovery = true;
	reachedConsistency = true;

	MessageContext = AllocSetContextCreate(TopMemoryContext, "MessageContext",
										   ALLOCSET_DEFAULT_SIZES);

	for (int rmid = 0; rmid <= RM_MAX_ID; rmid++)
	{
		if (RmgrIdExists(rmid) && RmgrTable[rmid].rm_startup != NULL)
			RmgrTable[rmid].rm_startup();
	}

	reader_state = XLogReaderAllocate(wal_segment_size, NULL,
									  XL_ROUTINE(.page_read = NULL,
												 .segment_open = NULL,
												 .segment_close = NULL),
									  NULL);
	if (reader_state == NULL)
		ereport(FATAL,
				(errcode(ERRCODE_OUT_OF_MEMORY),
				 errmsg("wal-redo: could not allocate a WAL reader")));
}

/* ---- input ---- */

static char stdin_buf[64 * 1024];
static size_t stdin_len = 0;
static size_t stdin_pos = 0;

/*
 * Reads exactly `count` bytes from stdin (buffered). Returns the number of
 * bytes read, less than `count` only at end of input.
 */
static size_t
read_stdin(char *dst, size_t count)
{
	size_t		done = 0;

	while (done < count)
	{
		size_t		n;

		if (stdin_pos == stdin_len)
		{
			ssize_t		got = read(STDIN_FILENO, stdin_buf, sizeof(stdin_buf));

			if (got < 0)
			{
				if (errno == EINTR)
					continue;
				ereport(FATAL,
						(errcode_for_file_access(),
						 errmsg("wal-redo: could not read from stdin: %m")));
			}
			if (got == 0)
				break;
			stdin_len = (size_t) got;
			stdin_pos = 0;
		}
		n = Min(stdin_len - stdin_pos, count - done);
		memcpy(dst + done, stdin_buf + stdin_pos, n);
		stdin_pos += n;
		done += n;
	}
	return done;
}

/*
 * Reads one message into `msg` (payload only) and returns its tag, or EOF
 * when stdin ends at a message boundary.
 */
static int
read_message(StringInfo msg)
{
	char		hdr[1 + LENGTH_FIELD_SIZE_BYTES];
	size_t		got;
	uint32		len;
	uint32		payload_len;

	got = read_stdin(hdr, sizeof(hdr));
	if (got == 0)
		return EOF;
	if (got != sizeof(hdr))
		ereport(FATAL,
				(errcode(ERRCODE_PROTOCOL_VIOLATION),
				 errmsg("wal-redo: stdin ended inside a message header")));

	memcpy(&len, hdr + 1, sizeof(len));
	len = pg_ntoh32(len);
	if (len < LENGTH_FIELD_SIZE_BYTES ||
		len - LENGTH_FIELD_SIZE_BYTES > MESSAGE_PAYLOAD_SIZE_BYTES_MAX)
		ereport(FATAL,
				(errcode(ERRCODE_PROTOCOL_VIOLATION),
				 errmsg("wal-redo: message '%c' has invalid length %u (must count its own 4 bytes, at most %u)",
						hdr[0], len, (uint32) (MESSAGE_PAYLOAD_SIZE_BYTES_MAX + LENGTH_FIELD_SIZE_BYTES))));
	payload_len = len - LENGTH_FIELD_SIZE_BYTES;

	enlargeStringInfo(msg, payload_len);
	got = read_stdin(msg->data, payload_len);
	if (got != payload_len)
		ereport(FATAL,
				(errcode(ERRCODE_PROTOCOL_VIOLATION),
				 errmsg("wal-redo: stdin ended inside a '%c' message (%zu of %u bytes)",
						hdr[0], got, payload_len)));
	msg->len = payload_len;
	msg->data[payload_len] = '\0';
	msg->cursor = 0;
	return (unsigned char) hdr[0];
}

static uint32
get_u32(StringInfo msg)
{
	uint32		v;

	Assert(msg->cursor + 4 <= msg->len);
	memcpy(&v, msg->data + msg->cursor, 4);
	msg->cursor += 4;
	return pg_ntoh32(v);
}

/* Parses a 17-byte BufferTag: fork u8, spcnode, dbnode, relnode, blkno (u32 BE). */
static void
get_buffer_tag(StringInfo msg, char tag, RelFileNode *rnode,
			   ForkNumber *forknum, BlockNumber *blkno)
{
	uint8		fork;

	if (msg->len - msg->cursor < BUFFER_TAG_SIZE_BYTES)
		ereport(FATAL,
				(errcode(ERRCODE_PROTOCOL_VIOLATION),
				 errmsg("wal-redo: '%c' message is too short for a buffer tag (%d bytes)",
						tag, msg->len - msg->cursor)));
	fork = (uint8) msg->data[msg->cursor++];
	rnode->spcNode = get_u32(msg);
	rnode->dbNode = get_u32(msg);
	rnode->relNode = get_u32(msg);
	*blkno = get_u32(msg);
	if (fork > MAX_FORKNUM)
		ereport(FATAL,
				(errcode(ERRCODE_PROTOCOL_VIOLATION),
				 errmsg("wal-redo: '%c' message names fork %u, the largest fork number is %d",
						tag, fork, MAX_FORKNUM)));
	*forknum = (ForkNumber) fork;
}

static void
expect_end(StringInfo msg, char tag)
{
	if (msg->cursor != msg->len)
		ereport(FATAL,
				(errcode(ERRCODE_PROTOCOL_VIOLATION),
				 errmsg("wal-redo: '%c' message has %d unexpected trailing bytes",
						tag, msg->len - msg->cursor)));
}

/* Fails unless the tag in `msg` is the target set by 'B'. */
static void
expect_target(StringInfo msg, char tag)
{
	RelFileNode rnode;
	ForkNumber	forknum;
	BlockNumber blkno;

	get_buffer_tag(msg, tag, &rnode, &forknum, &blkno);
	if (!target_valid)
		ereport(FATAL,
				(errcode(ERRCODE_PROTOCOL_VIOLATION),
				 errmsg("wal-redo: '%c' message before any 'B' (begin) message", tag)));
	if (!RelFileNodeEquals(rnode, target_rnode) || forknum != target_forknum ||
		blkno != target_blkno)
		ereport(FATAL,
				(errcode(ERRCODE_PROTOCOL_VIOLATION),
				 errmsg("wal-redo: '%c' message is for %u/%u/%u fork %d block %u, but redo was begun for %u/%u/%u fork %d block %u",
						tag, rnode.spcNode, rnode.dbNode, rnode.relNode, forknum, blkno,
						target_rnode.spcNode, target_rnode.dbNode, target_rnode.relNode,
						target_forknum, target_blkno)));
}

/* ---- requests ---- */

/*
 * 'B': forget everything about the previous block and make this one the
 * only block that exists.
 */
static void
handle_begin(StringInfo msg)
{
	RelFileNode rnode;
	ForkNumber	forknum;
	BlockNumber blkno;

	get_buffer_tag(msg, 'B', &rnode, &forknum, &blkno);
	expect_end(msg, 'B');
	if (blkno == InvalidBlockNumber)
		ereport(FATAL,
				(errcode(ERRCODE_PROTOCOL_VIOLATION),
				 errmsg("wal-redo: 'B' message names block number %u, which is InvalidBlockNumber",
						blkno)));

	/*
	 * The buffer pool may hold the previous target (and scratch pages), and
	 * SMgrRelations cache relation sizes: both would leak into this request.
	 */
	drop_all_buffers();
	smgrcloseall();

	target_rnode = rnode;
	target_forknum = forknum;
	target_blkno = blkno;
	target_valid = true;
	base_page_allowed = true;
	inmem_set_target(rnode, forknum, blkno);
}

/* 'P': the base image of the target block. */
static void
handle_push_page(StringInfo msg)
{
	expect_target(msg, 'P');
	if (msg->len - msg->cursor != BLCKSZ)
		ereport(FATAL,
				(errcode(ERRCODE_PROTOCOL_VIOLATION),
				 errmsg("wal-redo: 'P' message carries %d page bytes, expected %d",
						msg->len - msg->cursor, BLCKSZ)));
	if (!base_page_allowed)
		ereport(FATAL,
				(errcode(ERRCODE_PROTOCOL_VIOLATION),
				 errmsg("wal-redo: 'P' (base page) must directly follow 'B' (begin)")));
	inmem_set_target_page(msg->data + msg->cursor);
	base_page_allowed = false;
}

/* 'A': apply one record (u64 end LSN, then the raw XLogRecord) to the target. */
static void
handle_apply(StringInfo msg)
{
	uint32		hi;
	uint32		lo;
	XLogRecPtr	end_lsn;
	uint32		rec_len;
	XLogRecord *record;
	pg_crc32c	crc;
	DecodedXLogRecord *decoded;
	char	   *errormsg = NULL;
	ErrorContextCallback errcallback;

	if (!target_valid)
		ereport(FATAL,
				(errcode(ERRCODE_PROTOCOL_VIOLATION),
				 errmsg("wal-redo: 'A' message before any 'B' (begin) message")));
	if (msg->len < APPLY_HEADER_SIZE_BYTES + SizeOfXLogRecord)
		ereport(FATAL,
				(errcode(ERRCODE_PROTOCOL_VIOLATION),
				 errmsg("wal-redo: 'A' message of %d bytes is shorter than an LSN and a record header",
						msg->len)));
	hi = get_u32(msg);
	lo = get_u32(msg);
	end_lsn = ((uint64) hi << 32) | lo;
	rec_len = msg->len - msg->cursor;
	base_page_allowed = false;

	/* Decoding reads header fields in place: give it an aligned copy. */
	record = (XLogRecord *) palloc(rec_len);
	memcpy(record, msg->data + msg->cursor, rec_len);

	if (record->xl_tot_len != rec_len)
		ereport(FATAL,
				(errcode(ERRCODE_DATA_CORRUPTED),
				 errmsg("wal-redo: record ending at %X/%X says it is %u bytes long, the message carries %u",
						LSN_FORMAT_ARGS(end_lsn), record->xl_tot_len, rec_len)));

	/* Same check as xlogreader.c's ValidXLogRecord(). */
	INIT_CRC32C(crc);
	COMP_CRC32C(crc, ((char *) record) + SizeOfXLogRecord, rec_len - SizeOfXLogRecord);
	COMP_CRC32C(crc, (char *) record, offsetof(XLogRecord, xl_crc));
	FIN_CRC32C(crc);
	if (!EQ_CRC32C(record->xl_crc, crc))
		ereport(FATAL,
				(errcode(ERRCODE_DATA_CORRUPTED),
				 errmsg("wal-redo: record ending at %X/%X has a bad CRC (stored %08X, computed %08X)",
						LSN_FORMAT_ARGS(end_lsn), record->xl_crc, crc)));

	if (!RmgrIdExists(record->xl_rmid))
		ereport(FATAL,
				(errcode(ERRCODE_DATA_CORRUPTED),
				 errmsg("wal-redo: record ending at %X/%X has unknown resource manager id %u",
						LSN_FORMAT_ARGS(end_lsn), record->xl_rmid)));

	decoded = (DecodedXLogRecord *) palloc(DecodeXLogRecordRequiredSpace(rec_len));
	if (!DecodeXLogRecord(reader_state, decoded, record, end_lsn, &errormsg))
		ereport(FATAL,
				(errcode(ERRCODE_DATA_CORRUPTED),
				 errmsg("wal-redo: could not decode record ending at %X/%X: %s",
						LSN_FORMAT_ARGS(end_lsn), errormsg ? errormsg : "unknown error")));

	/*
	 * Redo routines read the record through the reader state, and stamp
	 * pages with EndRecPtr. We do not know where the record starts, so
	 * ReadRecPtr is the end as well (no redo routine we run depends on it).
	 */
	decoded->next_lsn = end_lsn;
	reader_state->record = decoded;
	reader_state->ReadRecPtr = end_lsn;
	reader_state->EndRecPtr = end_lsn;
	applying_end_lsn = end_lsn;

	errcallback.callback = apply_error_callback;
	errcallback.arg = (void *) reader_state;
	errcallback.previous = error_context_stack;
	error_context_stack = &errcallback;

	redo_read_buffer_filter = redo_block_filter;
	GetRmgr(record->xl_rmid).rm_redo(reader_state);
	redo_read_buffer_filter = NULL;

	error_context_stack = errcallback.previous;
	reader_state->record = NULL;
	applying_end_lsn = InvalidXLogRecPtr;
}

/* 'G': answer with the target page, exactly BLCKSZ bytes. */
static void
handle_get_page(StringInfo msg)
{
	Buffer		buf;
	PGAlignedBlock page;

	expect_target(msg, 'G');
	expect_end(msg, 'G');

	buf = ReadBufferWithoutRelcache(target_rnode, target_forknum, target_blkno,
									RBM_NORMAL, NULL, true);
	LockBuffer(buf, BUFFER_LOCK_SHARE);
	memcpy(page.data, BufferGetPage(buf), BLCKSZ);
	UnlockReleaseBuffer(buf);

	write_answer(page.data, BLCKSZ);
	base_page_allowed = false;
}

static void
write_answer(const char *data, size_t len)
{
	size_t		done = 0;

	while (done < len)
	{
		ssize_t		n = write(protocol_out_fd, data + done, len - done);

		if (n < 0)
		{
			if (errno == EINTR)
				continue;
			ereport(FATAL,
					(errcode_for_file_access(),
					 errmsg("wal-redo: could not write to stdout: %m")));
		}
		done += (size_t) n;
	}
}

/*
 * Invalidates every buffer without writing it back. DropDatabaseBuffers()
 * scans the whole (tiny) pool, so one call per database found is enough.
 */
static void
drop_all_buffers(void)
{
	for (int i = 0; i < NBuffers; i++)
	{
		BufferDesc *desc = GetBufferDescriptor(i);
		uint32		state = pg_atomic_read_u32(&desc->state);

		if (state & BM_TAG_VALID)
			DropDatabaseBuffers(desc->tag.rnode.dbNode);
	}
}

/*
 * redo_read_buffer_filter: skip the block references that would need a read
 * of a block other than the target (it does not exist here). Full-page
 * images and will-init blocks need no read, and some redo routines require a
 * buffer for them (callers of XLogInitBufferForRedo use it unconditionally;
 * XLOG_FPI and GIN/hash split redo insist on BLK_RESTORED), so those are
 * rebuilt in scratch buffers whose writes inmem_smgr drops.
 */
static bool
redo_block_filter(XLogReaderState *record, uint8 block_id)
{
	RelFileNode rnode;
	ForkNumber	forknum;
	BlockNumber blkno;

	if (!XLogRecGetBlockTagExtended(record, block_id, &rnode, &forknum, &blkno, NULL))
		return true;
	if (RelFileNodeEquals(rnode, target_rnode) && forknum == target_forknum &&
		blkno == target_blkno)
		return false;
	if (XLogRecBlockImageApply(record, block_id))
		return false;
	if (XLogRecGetBlock(record, block_id)->flags & BKPBLOCK_WILL_INIT)
		return false;
	return true;
}

/* Names the record and the block in every error raised while applying. */
static void
apply_error_callback(void *arg)
{
	XLogReaderState *record = (XLogReaderState *) arg;
	StringInfoData buf;

	initStringInfo(&buf);
	if (record->record != NULL)
		xlog_outdesc(&buf, record);
	errcontext("WAL redo of the record ending at %X/%X (%s) for block %u/%u/%u fork %d block %u",
			   LSN_FORMAT_ARGS(applying_end_lsn), buf.data,
			   target_rnode.spcNode, target_rnode.dbNode, target_rnode.relNode,
			   target_forknum, target_blkno);
}
