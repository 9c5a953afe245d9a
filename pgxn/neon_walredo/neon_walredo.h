/*-------------------------------------------------------------------------
 *
 * neon_walredo.h
 *	  Shared declarations of the WAL redo process (see README.md).
 *
 *-------------------------------------------------------------------------
 */
#ifndef NEON_WALREDO_H
#define NEON_WALREDO_H

#include "storage/block.h"
#include "storage/relfilenode.h"
#include "storage/smgr.h"

/* inmem_smgr.c: the storage manager of the redo process. */
extern const f_smgr *inmem_smgr_hook(RelFileNode rnode, BackendId backend);
extern void inmem_set_target(RelFileNode rnode, ForkNumber forknum,
							 BlockNumber blkno);
extern void inmem_set_target_page(const char *page);

/* fake_shmem.c: process-local "shared" memory, no data directory. */
extern void CreateFakeSharedMemoryAndSemaphores(void);

#endif							/* NEON_WALREDO_H */
