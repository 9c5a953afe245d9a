/*-------------------------------------------------------------------------
 *
 * fake_shmem.c
 *	  "Shared" memory of the WAL redo process, allocated with malloc.
 *
 * The redo process is a single process, so it needs no real shared memory.
 * CreateSharedMemoryAndSemaphores() would create a System V segment keyed
 * on a data directory and a POSIX dynamic shared memory control segment,
 * both of which outlive a process killed with SIGKILL (which is how the
 * pageserver stops a stuck redo process). This follows ipci.c's
 * CreateSharedMemoryAndSemaphores() of Postgres 15 step by step, with the
 * segment from malloc, and without the two steps that touch the data
 * directory or create files: AsyncShmemInit() (scans pg_notify) and
 * dsm_postmaster_startup(). Keep it in sync with ipci.c when Postgres moves.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <unistd.h>

#include "access/clog.h"
#include "access/commit_ts.h"
#include "access/heapam.h"
#include "access/multixact.h"
#include "access/nbtree.h"
#include "access/subtrans.h"
#include "access/syncscan.h"
#include "access/twophase.h"
#include "access/xlogprefetcher.h"
#include "access/xlogrecovery.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/autovacuum.h"
#include "postmaster/bgworker_internals.h"
#include "postmaster/bgwriter.h"
#include "postmaster/postmaster.h"
#include "replication/logicallauncher.h"
#include "replication/origin.h"
#include "replication/slot.h"
#include "replication/walreceiver.h"
#include "replication/walsender.h"
#include "storage/bufmgr.h"
#include "storage/dsm.h"
#include "storage/ipc.h"
#include "storage/pg_sema.h"
#include "storage/pg_shmem.h"
#include "storage/pmsignal.h"
#include "storage/predicate.h"
#include "storage/proc.h"
#include "storage/procarray.h"
#include "storage/procsignal.h"
#include "storage/sinvaladt.h"
#include "storage/spin.h"
#include "utils/snapmgr.h"

#include "neon_walredo.h"

void
CreateFakeSharedMemoryAndSemaphores(void)
{
	PGShmemHeader *hdr;
	Size		size;
	int			numSemas;
	char	   *saved_datadir = DataDir;

	size = CalculateShmemSize(&numSemas);
	hdr = (PGShmemHeader *) calloc(1, size);
	if (hdr == NULL)
		ereport(FATAL,
				(errcode(ERRCODE_OUT_OF_MEMORY),
				 errmsg("wal-redo: could not allocate %zu bytes of process-local shared memory",
						size)));
	hdr->creatorPID = getpid();
	hdr->magic = PGShmemMagic;
	hdr->dsm_control = 0;
	hdr->totalsize = size;
	hdr->freeoffset = MAXALIGN(sizeof(PGShmemHeader));
	UsedShmemSegAddr = hdr;

	InitShmemAccess(hdr);

	/*
	 * Unnamed POSIX semaphores live in the segment; PGReserveSemaphores only
	 * stats the data directory to seed key numbers it does not use then.
	 */
	DataDir = "/";
	PGReserveSemaphores(numSemas);
	DataDir = saved_datadir;

	InitShmemAllocation();
	CreateLWLocks();
	InitShmemIndex();
	dsm_shmem_init();

	XLOGShmemInit();
	XLogPrefetchShmemInit();
	XLogRecoveryShmemInit();
	CLOGShmemInit();
	CommitTsShmemInit();
	SUBTRANSShmemInit();
	MultiXactShmemInit();
	InitBufferPool();

	InitLocks();
	InitPredicateLocks();

	InitProcGlobal();
	CreateSharedProcArray();
	CreateSharedBackendStatus();
	TwoPhaseShmemInit();
	BackgroundWorkerShmemInit();

	CreateSharedInvalidationState();

	PMSignalShmemInit();
	ProcSignalShmemInit();
	CheckpointerShmemInit();
	AutoVacuumShmemInit();
	ReplicationSlotsShmemInit();
	ReplicationOriginShmemInit();
	WalSndShmemInit();
	WalRcvShmemInit();
	PgArchShmemInit();
	ApplyLauncherShmemInit();

	SnapMgrInit();
	BTreeShmemInit();
	SyncScanShmemInit();
	/* AsyncShmemInit() skipped: it scans pg_notify in the data directory. */
	StatsShmemInit();
	/* dsm_postmaster_startup() skipped: it creates a segment in /dev/shm. */

	if (shmem_startup_hook)
		shmem_startup_hook();
}
