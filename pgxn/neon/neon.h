/*-------------------------------------------------------------------------
 *
 * neon.h
 *	  The compute side of the pageserver: GUCs, the pagestream client and the
 *	  overlay storage manager (DESIGN D3).
 *
 *-------------------------------------------------------------------------
 */
#ifndef NEON_H
#define NEON_H

#include "access/xlogdefs.h"
#include "common/relpath.h"
#include "storage/block.h"
#include "storage/relfilenode.h"
#include "storage/smgr.h"

/* GUCs (neon.c) */
extern char *neon_pageserver_connstring;
extern char *neon_tenant_id;
extern char *neon_timeline_id;
extern int	neon_pageserver_timeout_ms;
extern int	neon_relsize_hash_size;
extern int	neon_readahead_blocks;

/* The LSN every pageserver read uses: neon.start_lsn or the control file's redo LSN. */
extern XLogRecPtr neon_start_lsn(void);

/* libpagestore.c: one pagestream connection per backend, opened lazily. */
extern bool ps_rel_exists(RelFileNode rnode, ForkNumber forknum);
extern BlockNumber ps_rel_nblocks(RelFileNode rnode, ForkNumber forknum);
extern void ps_get_page(RelFileNode rnode, ForkNumber forknum, BlockNumber blkno, char *buffer);
extern bool ps_prefetch_page(RelFileNode rnode, ForkNumber forknum, BlockNumber blkno);
extern int64 ps_db_size(Oid dbnode, XLogRecPtr lsn);

/* pagestore_smgr.c */
extern const f_smgr *neon_smgr_hook(RelFileNode rnode, BackendId backend);
extern Size relsize_shmem_size(void);
extern void relsize_shmem_init(void);

#endif							/* NEON_H */
