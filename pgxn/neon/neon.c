/*-------------------------------------------------------------------------
 *
 * neon.c
 *	  Module entry: GUCs, the storage manager hook, shared memory.
 *
 * The compute keeps every block it writes locally and reads every other
 * block from the pageserver at one LSN, the compute's start LSN (DESIGN
 * D3). That LSN is neon.start_lsn, or, when unset, the redo LSN of the
 * checkpoint in pg_control as the postmaster found it at startup: a
 * basebackup's control file points at the LSN it was taken at (DESIGN D4).
 * It is read once, in the postmaster, because later checkpoints of this
 * compute move the redo pointer while the pageserver image does not move.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xlog.h"
#include "catalog/pg_control.h"
#include "commands/defrem.h"
#include "common/controldata_utils.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "storage/ipc.h"
#include "storage/lwlock.h"
#include "storage/shmem.h"
#include "tcop/utility.h"
#include "utils/guc.h"
#include "utils/pg_lsn.h"

#include "neon.h"

PG_MODULE_MAGIC;

void		_PG_init(void);

char	   *neon_pageserver_connstring = NULL;
char	   *neon_tenant_id = NULL;
char	   *neon_timeline_id = NULL;
int			neon_pageserver_timeout_ms = 60000;
int			neon_relsize_hash_size = 16384;
int			neon_readahead_blocks = 32;
static char *neon_start_lsn_str = NULL;

/* Resolved in the postmaster (_PG_init), inherited by every child. */
static XLogRecPtr start_lsn = InvalidXLogRecPtr;

static shmem_request_hook_type prev_shmem_request_hook = NULL;
static shmem_startup_hook_type prev_shmem_startup_hook = NULL;

XLogRecPtr
neon_start_lsn(void)
{
	if (XLogRecPtrIsInvalid(start_lsn))
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("neon: no start LSN to read the pageserver at"),
				 errhint("Set neon.start_lsn, or start from a basebackup whose pg_control has a checkpoint.")));
	return start_lsn;
}

static void
resolve_start_lsn(void)
{
	if (neon_start_lsn_str != NULL && neon_start_lsn_str[0] != '\0')
	{
		bool		have_error = false;

		start_lsn = pg_lsn_in_internal(neon_start_lsn_str, &have_error);
		if (have_error || XLogRecPtrIsInvalid(start_lsn))
			ereport(FATAL,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("neon.start_lsn \"%s\" is not a valid LSN (expected X/X)",
							neon_start_lsn_str)));
	}
	else
	{
		bool		crc_ok = false;
		ControlFileData *cf = get_controlfile(DataDir, &crc_ok);

		if (!crc_ok)
			ereport(FATAL,
					(errmsg("neon: pg_control in \"%s\" has a bad checksum; cannot derive the start LSN",
							DataDir),
					 errhint("Set neon.start_lsn explicitly.")));
		start_lsn = cf->checkPointCopy.redo;
		pfree(cf);
	}
	elog(LOG, "neon: reading the pageserver at start LSN %X/%X",
		 LSN_FORMAT_ARGS(start_lsn));
}

static void
neon_shmem_request(void)
{
	if (prev_shmem_request_hook)
		prev_shmem_request_hook();
	RequestAddinShmemSpace(relsize_shmem_size());
	RequestNamedLWLockTranche("neon_relsize", 1);
}

static void
neon_shmem_startup(void)
{
	if (prev_shmem_startup_hook)
		prev_shmem_startup_hook();
	relsize_shmem_init();
}

/*
 * pg_database_size: the pageserver adds up the database's relations. A primary
 * asks at its flushed WAL position (the pageserver waits until it has
 * ingested that far), so what this compute wrote is counted; a read-only
 * compute asks at its start LSN.
 */
static int64
neon_dbsize(Oid dbNode)
{
	XLogRecPtr	lsn = RecoveryInProgress() ? neon_start_lsn() : GetFlushRecPtr(NULL);

	return ps_db_size(dbNode, lsn);
}

/*
 * Commands that copy a database's files with copydir() cannot work on a
 * compute: its data directory holds only the blocks it wrote. They are
 * refused before they do anything, with the alternative that works.
 */
static ProcessUtility_hook_type prev_ProcessUtility = NULL;

static void
refuse_file_copy(Node *stmt)
{
	ListCell   *lc;

	if (IsA(stmt, CreatedbStmt))
	{
		foreach(lc, ((CreatedbStmt *) stmt)->options)
		{
			DefElem    *opt = lfirst_node(DefElem, lc);

			if (strcmp(opt->defname, "strategy") == 0 && pg_strcasecmp(defGetString(opt), "file_copy") == 0)
				ereport(ERROR,
						(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
						 errmsg("CREATE DATABASE ... STRATEGY FILE_COPY is not supported on this compute: it copies files the compute does not have"),
						 errhint("Use the default STRATEGY WAL_LOG.")));
		}
	}
	else if (IsA(stmt, AlterDatabaseStmt))
	{
		foreach(lc, ((AlterDatabaseStmt *) stmt)->options)
		{
			DefElem    *opt = lfirst_node(DefElem, lc);

			if (strcmp(opt->defname, "tablespace") == 0)
				ereport(ERROR,
						(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
						 errmsg("ALTER DATABASE ... SET TABLESPACE is not supported on this compute: it copies files the compute does not have"),
						 errhint("Move tables one by one with ALTER TABLE ... SET TABLESPACE.")));
		}
	}
}

static void
neon_ProcessUtility(PlannedStmt *pstmt, const char *queryString, bool readOnlyTree,
					ProcessUtilityContext context, ParamListInfo params,
					QueryEnvironment *queryEnv, DestReceiver *dest, QueryCompletion *qc)
{
	refuse_file_copy(pstmt->utilityStmt);
	if (prev_ProcessUtility)
		prev_ProcessUtility(pstmt, queryString, readOnlyTree, context, params, queryEnv, dest, qc);
	else
		standard_ProcessUtility(pstmt, queryString, readOnlyTree, context, params, queryEnv, dest, qc);
}

void
_PG_init(void)
{
	if (!process_shared_preload_libraries_in_progress)
		ereport(ERROR,
				(errmsg("neon must be loaded with shared_preload_libraries = 'neon'")));

	DefineCustomStringVariable("neon.pageserver_connstring",
							   "libpq connection string of the pageserver.",
							   NULL, &neon_pageserver_connstring, "",
							   PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomStringVariable("neon.tenant_id", "Tenant of this compute.",
							   NULL, &neon_tenant_id, "",
							   PGC_POSTMASTER, 0, NULL, NULL, NULL);
	DefineCustomStringVariable("neon.timeline_id", "Timeline of this compute.",
							   NULL, &neon_timeline_id, "",
							   PGC_POSTMASTER, 0, NULL, NULL, NULL);
	DefineCustomStringVariable("neon.start_lsn",
							   "LSN at which blocks are read from the pageserver (default: the checkpoint redo LSN in pg_control at startup).",
							   NULL, &neon_start_lsn_str, "",
							   PGC_POSTMASTER, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("neon.pageserver_timeout",
							"Time limit for connecting to the pageserver and for each request.",
							NULL, &neon_pageserver_timeout_ms, 60000, 100, INT_MAX,
							PGC_SIGHUP, GUC_UNIT_MS, NULL, NULL, NULL);
	DefineCustomIntVariable("neon.relsize_hash_size",
							"Entries in the shared cache of relation sizes at the start LSN.",
							NULL, &neon_relsize_hash_size, 16384, 128, INT_MAX / 2,
							PGC_POSTMASTER, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("neon.readahead_blocks",
							"Blocks requested ahead of a sequential read from the pageserver (0: none).",
							NULL, &neon_readahead_blocks, 32, 0, 60,
							PGC_USERSET, 0, NULL, NULL, NULL);
	MarkGUCPrefixReserved("neon");

	resolve_start_lsn();

	prev_shmem_request_hook = shmem_request_hook;
	shmem_request_hook = neon_shmem_request;
	prev_shmem_startup_hook = shmem_startup_hook;
	shmem_startup_hook = neon_shmem_startup;

	smgr_hook = neon_smgr_hook;
	dbsize_hook = neon_dbsize;
	prev_ProcessUtility = ProcessUtility_hook;
	ProcessUtility_hook = neon_ProcessUtility;
}
