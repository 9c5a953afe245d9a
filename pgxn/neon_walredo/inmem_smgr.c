/*-------------------------------------------------------------------------
 *
 * inmem_smgr.c
 *	  The storage manager of the WAL redo process: nothing on disk.
 *
 * The redo process reconstructs one block per request (the "target"). Only
 * that block has content: reads of it return the base image pushed by the
 * pageserver (or zeros when there is none, for records that initialise the
 * page), and writes of it (buffer eviction) are kept here.
 *
 * Redo also touches blocks other than the target: block references the
 * redo filter lets through because they need no read (full-page images and
 * will-init blocks are rebuilt in scratch buffers, since some redo routines
 * insist on a buffer for them), and pages updated on the side (heap redo
 * clears visibility-map bits and updates the free space map). Those read as
 * zeros and writes to them are dropped: their content does not matter for
 * the target.
 *
 * Every fork claims MaxBlockNumber blocks, so every block "exists": redo
 * never extends a relation page by page up to a high block number (which
 * would cost one buffer per block), and a record for the target never finds
 * it missing.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "storage/smgr.h"

#include "neon_walredo.h"

static bool target_valid = false;
static RelFileNode target_rnode;
static ForkNumber target_forknum;
static BlockNumber target_blkno;

/* The target block as the smgr sees it: the base image, then evictions. */
static PGAlignedBlock target_page;
static bool target_page_valid = false;

static bool
is_target(SMgrRelation reln, ForkNumber forknum)
{
	return target_valid &&
		RelFileNodeEquals(reln->smgr_rnode.node, target_rnode) &&
		forknum == target_forknum;
}

static void
inmem_open(SMgrRelation reln)
{
}

static void
inmem_close(SMgrRelation reln, ForkNumber forknum)
{
}

static void
inmem_create(SMgrRelation reln, ForkNumber forknum, bool isRedo)
{
}

static bool
inmem_exists(SMgrRelation reln, ForkNumber forknum)
{
	return true;
}

static void
inmem_unlink(RelFileNodeBackend rnode, ForkNumber forknum, bool isRedo)
{
}

static void
inmem_write(SMgrRelation reln, ForkNumber forknum, BlockNumber blocknum,
			char *buffer, bool skipFsync)
{
	if (is_target(reln, forknum) && blocknum == target_blkno)
	{
		memcpy(target_page.data, buffer, BLCKSZ);
		target_page_valid = true;
	}
}

static void
inmem_extend(SMgrRelation reln, ForkNumber forknum, BlockNumber blocknum,
			 char *buffer, bool skipFsync)
{
	inmem_write(reln, forknum, blocknum, buffer, skipFsync);
}

static bool
inmem_prefetch(SMgrRelation reln, ForkNumber forknum, BlockNumber blocknum)
{
	return true;
}

static void
inmem_read(SMgrRelation reln, ForkNumber forknum, BlockNumber blocknum,
		   char *buffer)
{
	if (is_target(reln, forknum) && blocknum == target_blkno && target_page_valid)
		memcpy(buffer, target_page.data, BLCKSZ);
	else
		MemSet(buffer, 0, BLCKSZ);
}

static void
inmem_writeback(SMgrRelation reln, ForkNumber forknum,
				BlockNumber blocknum, BlockNumber nblocks)
{
}

static BlockNumber
inmem_nblocks(SMgrRelation reln, ForkNumber forknum)
{
	return MaxBlockNumber;
}

static void
inmem_truncate(SMgrRelation reln, ForkNumber forknum,
			   BlockNumber old_blocks, BlockNumber nblocks)
{
}

static void
inmem_immedsync(SMgrRelation reln, ForkNumber forknum)
{
}

static const f_smgr inmem_smgr = {
	.smgr_init = NULL,
	.smgr_shutdown = NULL,
	.smgr_open = inmem_open,
	.smgr_close = inmem_close,
	.smgr_create = inmem_create,
	.smgr_exists = inmem_exists,
	.smgr_unlink = inmem_unlink,
	.smgr_extend = inmem_extend,
	.smgr_prefetch = inmem_prefetch,
	.smgr_read = inmem_read,
	.smgr_write = inmem_write,
	.smgr_writeback = inmem_writeback,
	.smgr_nblocks = inmem_nblocks,
	.smgr_truncate = inmem_truncate,
	.smgr_immedsync = inmem_immedsync,
};

const f_smgr *
inmem_smgr_hook(RelFileNode rnode, BackendId backend)
{
	return &inmem_smgr;
}

/*
 * Starts a new request: `blkno` of `forknum` of `rnode` is the only block
 * that exists from now on, and it reads as zeros until a base image arrives.
 * The caller has dropped all buffers and closed all SMgrRelations, so no
 * cached relation size survives from the previous target.
 */
void
inmem_set_target(RelFileNode rnode, ForkNumber forknum, BlockNumber blkno)
{
	target_rnode = rnode;
	target_forknum = forknum;
	target_blkno = blkno;
	target_valid = true;
	target_page_valid = false;
}

/* The base image of the target block. */
void
inmem_set_target_page(const char *page)
{
	Assert(target_valid);
	memcpy(target_page.data, page, BLCKSZ);
	target_page_valid = true;
}
