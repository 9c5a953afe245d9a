/*-------------------------------------------------------------------------
 *
 * pagestore_smgr.c
 *	  The overlay storage manager of a compute (DESIGN D3).
 *
 * For a permanent relation fork, a block the compute has written (evicted
 * dirty, extended) lives in a local md file for the compute's lifetime; any
 * other block is read from the pageserver at the start LSN, since nothing
 * but this compute (one primary per timeline) can have changed it since.
 *
 * Per fork, the shared "relsize" entry holds what the pageserver has at the
 * start LSN, with this compute's overrides:
 *	 ps_exists		the fork exists on the pageserver (and was not dropped or
 *					replaced here);
 *	 ps_visible		blocks [0, ps_visible) that were not written locally are
 *					the pageserver's: Nblocks@start_lsn, lowered by every
 *					truncation here, 0 for a fork created here.
 * The local md file, when one exists, is sparse: a block the compute never
 * wrote below ps_visible is a hole and reads as zeros, and an all-zeros
 * local page below ps_visible is taken to be such a hole (Postgres does not
 * write an all-zeros page over a page with content; a truncation, which
 * could precede one, lowers ps_visible). So:
 *	 exists	 = local file exists || ps_exists
 *	 nblocks = max(local nblocks, ps_visible)
 *	 read(b) = the local page if b < local nblocks and (b >= ps_visible or
 *			   the page is not all zeros), else GetPage@start_lsn if
 *			   b < ps_visible.
 * Writes, extensions and truncations never need the pageserver.
 *
 * Entries with an override (created, truncated here) are pinned; the others
 * are a cache of the immutable pageserver image and are evicted when the
 * table is full. Temporary relations never come here (smgr_hook is only
 * asked about non-temp relations) and use md directly.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xlogutils.h"
#include "miscadmin.h"
#include "storage/lwlock.h"
#include "storage/md.h"
#include "storage/shmem.h"
#include "utils/hsearch.h"
#include "utils/rel.h"

#include "neon.h"

typedef struct RelSizeKey
{
	RelFileNode rnode;
	ForkNumber	forknum;
} RelSizeKey;

typedef struct RelSizeEntry
{
	RelSizeKey	key;			/* hash key: must be first */
	bool		ps_exists;
	bool		pinned;			/* holds an override: never evicted */
	BlockNumber ps_visible;
} RelSizeEntry;

static HTAB *relsize_hash = NULL;
static LWLock *relsize_lock = NULL;

Size
relsize_shmem_size(void)
{
	return hash_estimate_size(neon_relsize_hash_size, sizeof(RelSizeEntry));
}

void
relsize_shmem_init(void)
{
	HASHCTL		info;

	LWLockAcquire(AddinShmemInitLock, LW_EXCLUSIVE);
	info.keysize = sizeof(RelSizeKey);
	info.entrysize = sizeof(RelSizeEntry);
	relsize_hash = ShmemInitHash("neon relation sizes at the start LSN",
								 neon_relsize_hash_size, neon_relsize_hash_size,
								 &info, HASH_ELEM | HASH_BLOBS);
	relsize_lock = &(GetNamedLWLockTranche("neon_relsize"))->lock;
	LWLockRelease(AddinShmemInitLock);
}

static RelSizeKey
relsize_key(RelFileNode rnode, ForkNumber forknum)
{
	RelSizeKey	key;

	memset(&key, 0, sizeof(key));
	key.rnode = rnode;
	key.forknum = forknum;
	return key;
}

/*
 * Finds or makes the entry for key; caller holds relsize_lock exclusively.
 * NULL when the table is full of pinned entries.
 */
static RelSizeEntry *
relsize_enter(RelSizeKey *key, bool *found)
{
	RelSizeEntry *e = hash_search(relsize_hash, key, HASH_ENTER_NULL, found);

	if (e == NULL)
	{
		HASH_SEQ_STATUS scan;
		RelSizeEntry *victim;

		/* evict one cache-only entry: the pageserver can answer it again */
		hash_seq_init(&scan, relsize_hash);
		while ((victim = hash_seq_search(&scan)) != NULL)
		{
			if (!victim->pinned)
			{
				hash_search(relsize_hash, &victim->key, HASH_REMOVE, NULL);
				hash_seq_term(&scan);
				break;
			}
		}
		e = hash_search(relsize_hash, key, HASH_ENTER_NULL, found);
	}
	return e;
}

/* What the pageserver has for this fork at the start LSN, with our overrides. */
static void
relsize_get(RelFileNode rnode, ForkNumber forknum, bool *ps_exists, BlockNumber *ps_visible)
{
	RelSizeKey	key = relsize_key(rnode, forknum);
	RelSizeEntry *e;
	bool		found;
	bool		exists;
	BlockNumber n = 0;

	LWLockAcquire(relsize_lock, LW_SHARED);
	e = hash_search(relsize_hash, &key, HASH_FIND, NULL);
	if (e != NULL)
	{
		*ps_exists = e->ps_exists;
		*ps_visible = e->ps_visible;
		LWLockRelease(relsize_lock);
		return;
	}
	LWLockRelease(relsize_lock);

	/* ask without holding the lock: the answer at the start LSN never changes */
	exists = ps_rel_exists(rnode, forknum);
	if (exists)
		n = ps_rel_nblocks(rnode, forknum);

	LWLockAcquire(relsize_lock, LW_EXCLUSIVE);
	e = relsize_enter(&key, &found);
	if (e != NULL && !found)
	{
		e->ps_exists = exists;
		e->ps_visible = n;
		e->pinned = false;
	}
	if (e != NULL)
	{
		/* an override made meanwhile (create, truncate) wins */
		exists = e->ps_exists;
		n = e->ps_visible;
	}
	LWLockRelease(relsize_lock);
	*ps_exists = exists;
	*ps_visible = n;
}

/* The fork was created here: nothing of it is the pageserver's. */
static void
relsize_set_created(RelFileNode rnode, ForkNumber forknum)
{
	RelSizeKey	key = relsize_key(rnode, forknum);
	RelSizeEntry *e;
	bool		found;

	LWLockAcquire(relsize_lock, LW_EXCLUSIVE);
	e = relsize_enter(&key, &found);
	if (e == NULL)
	{
		LWLockRelease(relsize_lock);
		ereport(ERROR,
				(errcode(ERRCODE_OUT_OF_MEMORY),
				 errmsg("neon: the relation size table is full (neon.relsize_hash_size = %d)",
						neon_relsize_hash_size),
				 errhint("Increase neon.relsize_hash_size and restart the compute.")));
	}
	e->ps_exists = false;
	e->ps_visible = 0;
	e->pinned = true;
	LWLockRelease(relsize_lock);
}

static void
relsize_truncate(RelFileNode rnode, ForkNumber forknum, BlockNumber nblocks)
{
	RelSizeKey	key = relsize_key(rnode, forknum);
	RelSizeEntry *e;
	bool		exists;
	BlockNumber visible;

	/* make sure the entry exists: the truncation must outlive eviction */
	relsize_get(rnode, forknum, &exists, &visible);
	if (visible <= nblocks)
		return;
	LWLockAcquire(relsize_lock, LW_EXCLUSIVE);
	e = hash_search(relsize_hash, &key, HASH_FIND, NULL);
	if (e == NULL)
	{
		bool		found;

		e = relsize_enter(&key, &found);
		if (e != NULL && !found)
		{
			e->ps_exists = exists;
			e->ps_visible = visible;
		}
	}
	if (e == NULL)
	{
		LWLockRelease(relsize_lock);
		ereport(ERROR,
				(errcode(ERRCODE_OUT_OF_MEMORY),
				 errmsg("neon: the relation size table is full (neon.relsize_hash_size = %d)",
						neon_relsize_hash_size),
				 errhint("Increase neon.relsize_hash_size and restart the compute.")));
	}
	e->ps_visible = Min(e->ps_visible, nblocks);
	e->pinned = true;
	LWLockRelease(relsize_lock);
}

/* The fork was dropped here: it no longer exists anywhere. */
static void
relsize_set_dropped(RelFileNode rnode, ForkNumber forknum)
{
	RelSizeKey	key = relsize_key(rnode, forknum);
	RelSizeEntry *e;

	LWLockAcquire(relsize_lock, LW_EXCLUSIVE);
	e = hash_search(relsize_hash, &key, HASH_FIND, NULL);
	if (e != NULL)
	{
		/*
		 * Its relfilenode can only come back through a create, which sets
		 * its own override: the entry need not be pinned any more.
		 */
		e->ps_exists = false;
		e->ps_visible = 0;
		e->pinned = false;
	}
	LWLockRelease(relsize_lock);
}

/* Does this fork have a local md file? Opens it (and keeps it open) if so. */
static bool
local_exists(SMgrRelation reln, ForkNumber forknum)
{
	if (reln->md_num_open_segs[forknum] > 0)
		return true;
	return mdexists(reln, forknum);
}

static void
local_ensure(SMgrRelation reln, ForkNumber forknum)
{
	if (!local_exists(reln, forknum))
		mdcreate(reln, forknum, true);	/* isRedo: another backend may race us */
}

static bool
page_is_all_zeros(const char *page)
{
	const uint64 *w = (const uint64 *) page;

	for (int i = 0; i < BLCKSZ / sizeof(uint64); i++)
		if (w[i] != 0)
			return false;
	return true;
}

static void
neon_open(SMgrRelation reln)
{
	mdopen(reln);
}

static void
neon_close(SMgrRelation reln, ForkNumber forknum)
{
	mdclose(reln, forknum);
}

static void
neon_create(SMgrRelation reln, ForkNumber forknum, bool isRedo)
{
	/*
	 * Outside redo, smgrcreate makes a new fork (a new relfilenode, a new FSM,
	 * VM or init fork): whatever the pageserver has under that name is not
	 * it. Redo re-creates forks that may well exist on the pageserver.
	 */
	if (!isRedo)
		relsize_set_created(reln->smgr_rnode.node, forknum);
	mdcreate(reln, forknum, isRedo);
}

static bool
neon_exists(SMgrRelation reln, ForkNumber forknum)
{
	bool		ps_exists;
	BlockNumber ps_visible;

	if (local_exists(reln, forknum))
		return true;
	/* relfilenode 0: a relation without storage (pg_relation_size of a view asks) */
	if (reln->smgr_rnode.node.relNode == InvalidOid)
		return false;
	relsize_get(reln->smgr_rnode.node, forknum, &ps_exists, &ps_visible);
	return ps_exists;
}

static void
neon_unlink(RelFileNodeBackend rnode, ForkNumber forknum, bool isRedo)
{
	relsize_set_dropped(rnode.node, forknum);
	mdunlink(rnode, forknum, isRedo);
}

static void
neon_extend(SMgrRelation reln, ForkNumber forknum, BlockNumber blocknum,
			char *buffer, bool skipFsync)
{
	local_ensure(reln, forknum);
	mdextend(reln, forknum, blocknum, buffer, skipFsync);
}

/* Whether a read of the block would go to the pageserver (cheap checks only). */
static bool
from_pageserver(SMgrRelation reln, ForkNumber forknum, BlockNumber blocknum)
{
	bool		ps_exists;
	BlockNumber ps_visible;

	relsize_get(reln->smgr_rnode.node, forknum, &ps_exists, &ps_visible);
	if (blocknum >= ps_visible)
		return false;
	/* a block inside the local file is usually the compute's own */
	return !local_exists(reln, forknum) || blocknum >= mdnblocks(reln, forknum);
}

static bool
neon_prefetch(SMgrRelation reln, ForkNumber forknum, BlockNumber blocknum)
{
	if (from_pageserver(reln, forknum, blocknum))
		(void) ps_prefetch_page(reln->smgr_rnode.node, forknum, blocknum);
	return true;
}

/*
 * Read-ahead: a backend reading consecutive blocks of a fork from the
 * pageserver (sequential scans, VACUUM, index builds; Postgres 15 does not
 * prefetch those itself) gets the next neon.readahead_blocks requested
 * ahead, so their answers arrive while it works on the current one.
 */
static RelFileNode ra_rnode;
static ForkNumber ra_forknum = InvalidForkNumber;
static BlockNumber ra_last = InvalidBlockNumber;	/* last block read from the pageserver */
static BlockNumber ra_until = 0;	/* blocks below this were requested already */

static void
ps_readahead(SMgrRelation reln, ForkNumber forknum, BlockNumber blocknum, BlockNumber ps_visible)
{
	RelFileNode rnode = reln->smgr_rnode.node;
	bool		sequential = forknum == ra_forknum && RelFileNodeEquals(rnode, ra_rnode) &&
		ra_last != InvalidBlockNumber && blocknum == ra_last + 1;

	ra_rnode = rnode;
	ra_forknum = forknum;
	ra_last = blocknum;
	if (!sequential || neon_readahead_blocks == 0)
	{
		ra_until = blocknum + 1;
		return;
	}
	for (BlockNumber b = Max(ra_until, blocknum + 1);
		 b < ps_visible && b <= blocknum + (BlockNumber) neon_readahead_blocks; b++)
	{
		if (!ps_prefetch_page(rnode, forknum, b))
			break;
		ra_until = b + 1;
	}
}

static void
neon_read(SMgrRelation reln, ForkNumber forknum, BlockNumber blocknum, char *buffer)
{
	RelFileNode rnode = reln->smgr_rnode.node;
	bool		ps_exists;
	BlockNumber ps_visible;
	BlockNumber local_n = 0;

	relsize_get(rnode, forknum, &ps_exists, &ps_visible);
	if (local_exists(reln, forknum))
	{
		local_n = mdnblocks(reln, forknum);
		if (blocknum < local_n)
		{
			mdread(reln, forknum, blocknum, buffer);
			if (blocknum >= ps_visible || !page_is_all_zeros(buffer))
				return;
			/* a hole: the compute never wrote this block */
		}
	}
	if (blocknum < ps_visible)
	{
		if (blocknum >= local_n)
			ps_readahead(reln, forknum, blocknum, ps_visible);
		ps_get_page(rnode, forknum, blocknum, buffer);
		return;
	}
	if (InRecovery)
	{
		/* as md: redo may read past the end of a relation it will extend */
		MemSet(buffer, 0, BLCKSZ);
		return;
	}
	ereport(ERROR,
			(errcode(ERRCODE_DATA_CORRUPTED),
			 errmsg("could not read block %u in relation %u/%u/%u fork %d: it has only %u blocks (%u local, %u on the pageserver at the start LSN)",
					blocknum, rnode.spcNode, rnode.dbNode, rnode.relNode, forknum,
					Max(local_n, ps_visible), local_n, ps_visible)));
}

static void
neon_write(SMgrRelation reln, ForkNumber forknum, BlockNumber blocknum,
		   char *buffer, bool skipFsync)
{
	local_ensure(reln, forknum);

	/*
	 * A block of the pageserver's part may lie beyond the local file, even
	 * beyond its last segment: extend (sparsely) rather than write.
	 */
	if (blocknum >= mdnblocks(reln, forknum))
		mdextend(reln, forknum, blocknum, buffer, skipFsync);
	else
		mdwrite(reln, forknum, blocknum, buffer, skipFsync);
}

static void
neon_writeback(SMgrRelation reln, ForkNumber forknum, BlockNumber blocknum,
			   BlockNumber nblocks)
{
	if (local_exists(reln, forknum))
		mdwriteback(reln, forknum, blocknum, nblocks);
}

static BlockNumber
neon_nblocks(SMgrRelation reln, ForkNumber forknum)
{
	RelFileNode rnode = reln->smgr_rnode.node;
	bool		ps_exists;
	BlockNumber ps_visible;

	relsize_get(rnode, forknum, &ps_exists, &ps_visible);
	if (local_exists(reln, forknum))
		return Max(mdnblocks(reln, forknum), ps_visible);
	if (!ps_exists)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_FILE),
				 errmsg("relation %u/%u/%u fork %d does not exist locally nor on the pageserver at the start LSN",
						rnode.spcNode, rnode.dbNode, rnode.relNode, forknum)));
	return ps_visible;
}

static void
neon_truncate(SMgrRelation reln, ForkNumber forknum, BlockNumber old_blocks,
			  BlockNumber nblocks)
{
	relsize_truncate(reln->smgr_rnode.node, forknum, nblocks);
	if (local_exists(reln, forknum))
	{
		BlockNumber local_n = mdnblocks(reln, forknum);

		if (nblocks < local_n)
			mdtruncate(reln, forknum, local_n, nblocks);
	}
}

static void
neon_immedsync(SMgrRelation reln, ForkNumber forknum)
{
	if (local_exists(reln, forknum))
		mdimmedsync(reln, forknum);
}

static const f_smgr neon_smgr = {
	.smgr_init = NULL,
	.smgr_shutdown = NULL,
	.smgr_open = neon_open,
	.smgr_close = neon_close,
	.smgr_create = neon_create,
	.smgr_exists = neon_exists,
	.smgr_unlink = neon_unlink,
	.smgr_extend = neon_extend,
	.smgr_prefetch = neon_prefetch,
	.smgr_read = neon_read,
	.smgr_write = neon_write,
	.smgr_writeback = neon_writeback,
	.smgr_nblocks = neon_nblocks,
	.smgr_truncate = neon_truncate,
	.smgr_immedsync = neon_immedsync,
};

const f_smgr *
neon_smgr_hook(RelFileNode rnode, BackendId backend)
{
	return &neon_smgr;
}
