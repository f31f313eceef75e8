/*-------------------------------------------------------------------------
 *
 * walredod_redo.c
 *		WAL redo child for walredod, running inside an unpatched PostgreSQL 15
 *		single-user backend.
 *
 * The module is loaded through session_preload_libraries.  In a single-user
 * backend that happens at the end of InitPostgres, when the backend is fully
 * initialised but nothing has read stdin yet.  With walredod.serve = on, the
 * module's _PG_init never returns: it takes over stdin/stdout and serves the
 * wal-redo pipe protocol (the one Neon's "postgres --wal-redo" speaks):
 *
 *		'B' begin redo of a block		tag
 *		'P' push the block's base page	tag + BLCKSZ bytes
 *		'A' apply a record				end LSN (u64) + whole XLogRecord
 *		'G' get the page				tag; reply: BLCKSZ bytes
 *		'H' ping						reply: BLCKSZ zero bytes
 *
 * Every message is a tag byte and a big-endian u32 length counting itself and
 * the body.  A block tag is forknum (u8), spcnode, dbnode, relnode, blkno
 * (u32 each), big-endian.  EOF on stdin ends the process.  Errors are written
 * to stderr and end the process: the parent sees EOF on our stdout.
 *
 * Stock PostgreSQL has no hook to make redo change only one block, so every
 * block reference of a record is remapped before rm_redo: the target block to
 * a scratch relation, every other block id i to a dummy relation D_i (fork and
 * block number kept, since redo code uses block numbers semantically).  Dummy
 * blocks that redo would read are pre-loaded as initialised pages with the
 * highest LSN, so redo sees a valid buffer that is "already applied" and
 * changes nothing.  No page is ever written to disk: dirty buffers of these
 * relations are dropped, never flushed.
 *
 * Heap records come in two layouts, vanilla PostgreSQL 15's and Neon
 * compute's; walredod.wal_format says which this child serves, and a record
 * in the other is refused before it is applied (see wal_format.c).
 *
 * Copyright (c) 2026, the walredod developers.
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#include "access/xlog.h"
#include "access/xlog_internal.h"
#include "access/xlogreader.h"
#include "access/xlogrecord.h"
#include "access/xlogrecovery.h"
#include "access/xlogutils.h"
#include "access/heapam_xlog.h"
#include "catalog/pg_tablespace_d.h"
#include "common/relpath.h"
#include "executor/instrument.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "port/pg_crc32c.h"
#include "storage/bufmgr.h"
#include "storage/buf_internals.h"
#include "storage/copydir.h"
#include "storage/fd.h"
#include "storage/ipc.h"
#include "storage/smgr.h"
#include "storage/standby.h"
#include "utils/guc.h"
#include "utils/memutils.h"
#include "utils/resowner.h"

#include "block_images.h"
#include "sandbox.h"
#include "wal_format.h"
#include "walredod_redo.h"

PG_MODULE_MAGIC;

void		_PG_init(void);

/*
 * A message on the wire: a tag byte, then a big-endian u32 length counting
 * itself and the body.
 */
#define MSG_LENGTH_FIELD_LEN	4
#define MSG_HEADER_LEN			(1 + MSG_LENGTH_FIELD_LEN)
/* Size of a block tag on the wire: forknum u8 + four u32. */
#define WIRE_TAG_LEN	17
/* Largest message we accept: no WAL record reaches 1GB. */
#define MAX_MESSAGE_LEN ((uint32) MaxAllocSize)

/*
 * The relations redo is pointed at.  They live in a database OID no catalog
 * knows about, in the default tablespace of the scratch cluster.
 */
#define SCRATCH_DB_OID		4000000000U
#define SCRATCH_REL_OID		1
#define DUMMY_REL_OID_BASE	1000
#define NUM_DUMMY_RELS		(XLR_MAX_BLOCK_ID + 1)

/* Heap blocks covered by one visibility map page (see visibilitymap.c). */
#define VM_HEAPBLOCKS_PER_PAGE \
	((BLCKSZ - MAXALIGN(SizeOfPageHeaderData)) * (BITS_PER_BYTE / 2))

/* GUC: serve the protocol on stdin/stdout; the module is inert otherwise. */
static bool walredod_serve = false;

/* The block the current request rebuilds. */
typedef struct RedoTarget
{
	bool		active;			/* between 'B' and 'G' */
	RelFileNode client_rnode;	/* as the client named it */
	ForkNumber	client_fork;
	BlockNumber blkno;
	ForkNumber	fork;			/* fork inside the scratch relation */
	Buffer		buffer;			/* where it sat last: a lookup hint */
} RedoTarget;

static RedoTarget target;

static RelFileNode scratch_rnode;
static RelFileNode dummy_rnodes[NUM_DUMMY_RELS];

static XLogReaderState *reader;
static DecodedXLogRecord *decoded;
static size_t decoded_size;

static MemoryContext redo_context;

/* Our own stdin buffer and the descriptor replies go to. */
static int	reply_fd = -1;
static char *inbuf;
static size_t inbuf_size;
#define INBUF_INITIAL	(256 * 1024)
#define INBUF_KEEP		(8 * 1024 * 1024)	/* larger is given back after use */
static size_t inbuf_start;		/* first unconsumed byte */
static size_t inbuf_end;		/* one past the last byte read */

/* True while dirty buffers of ours exist: dying then must skip shutdown. */
static bool request_in_progress = false;

/*
 * Counters reported at exit, for benchmarks: requests, records, and the CPU
 * time spent from the first request on (we sleep in read() between requests,
 * so that is the time spent serving them, without a clock call per request).
 */
static uint64 stat_requests;
static uint64 stat_records;
static uint64 cpu_at_first_request_ns;

static int64 blocks_written_at_start;
static bool walredod_source_logs_hint_bits = false;
static int	walredod_wal_format = WAL_FORMAT_VANILLA;

/*
 * Error replies on stdin (walredod.pipe_error_replies, which our engine sets;
 * Neon's protocol has none, so it is off by default).  A request is then read
 * whole, 'B' to 'G', and checked before redo touches anything, as on the
 * local data path, and every reply starts with a status byte: PIPE_REPLY_OK
 * then the page, or a refusal then a u32 length and a message.  A refused
 * request leaves the process serving.
 */
#define PIPE_REPLY_OK		0
#define PIPE_REPLY_INVALID	1	/* the request is wrong */
#define PIPE_REPLY_INTERNAL 2	/* refused for a reason of ours */
static bool walredod_pipe_error_replies = false;
static int	walredod_spin_wait_us = 0;
static XLogRecPtr wal_insert_at_start;

static void serve(void) pg_attribute_noreturn();
static void copy_target_page(char *page);
static bool fill_input(size_t want, bool at_message_start);


/*
 * CPU time, not wall time: on a CPU shared with the caller, the write of a
 * reply wakes it and we may be preempted inside write(); that wait is the
 * caller's time, not ours.
 */
static uint64
cpu_time_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
	return (uint64) ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/*
 * Open a relation of ours at smgr level.  Its cached size is set to the
 * largest block number, which (with InRecovery set) makes redo believe every
 * block exists: no redo path then extends, and so writes, a file.
 */
static SMgrRelation
open_scratch_rel(RelFileNode rnode)
{
	SMgrRelation reln = smgropen(rnode, InvalidBackendId);

	for (int fork = 0; fork <= MAX_FORKNUM; fork++)
		reln->smgr_cached_nblocks[fork] = MaxBlockNumber;
	return reln;
}

/*
 * Remove what earlier children left in the scratch database (a killed child
 * may leave 1GB segment files after touching high block numbers) and create
 * every fork's file, so reads that bypass the buffer-read helpers of redo
 * (visibility map pins) find a file to read zeros from.
 */
static void
prepare_scratch_relations(void)
{
	char	   *dbpath = GetDatabasePath(SCRATCH_DB_OID,
										 DEFAULTTABLESPACE_OID);

	if (access(dbpath, F_OK) == 0)
		rmtree(dbpath, true);
	if (MakePGDirectory(dbpath) < 0 && errno != EEXIST)
		ereport(ERROR,
				(errcode_for_file_access(),
				 errmsg("walredod: could not create directory \"%s\": %m",
						dbpath)));

	scratch_rnode.spcNode = DEFAULTTABLESPACE_OID;
	scratch_rnode.dbNode = SCRATCH_DB_OID;
	scratch_rnode.relNode = SCRATCH_REL_OID;
	for (int i = 0; i < NUM_DUMMY_RELS; i++)
	{
		dummy_rnodes[i] = scratch_rnode;
		dummy_rnodes[i].relNode = DUMMY_REL_OID_BASE + i;
	}

	for (int i = -1; i < NUM_DUMMY_RELS; i++)
	{
		RelFileNode rnode = i < 0 ? scratch_rnode : dummy_rnodes[i];
		SMgrRelation reln = open_scratch_rel(rnode);

		for (int fork = 0; fork <= MAX_FORKNUM; fork++)
			smgrcreate(reln, fork, true);
	}
}

/*
 * Drop every buffer of the given relations without writing it.  The page
 * LSNs come from the client's WAL, far beyond the scratch cluster's own, so a
 * flush would fail (or succeed and leave a stale page on disk).
 */
static void
drop_relations(RelFileNode *rnodes, int n)
{
	SMgrRelation rels[NUM_DUMMY_RELS + 1];

	Assert(n <= NUM_DUMMY_RELS + 1);
	for (int i = 0; i < n; i++)
		rels[i] = open_scratch_rel(rnodes[i]);
	DropRelFileNodesAllBuffers(rels, n);
}

/* Drop the scratch relation's buffers of one fork. */
static void
drop_scratch_fork(ForkNumber fork)
{
	SMgrRelation reln = open_scratch_rel(scratch_rnode);
	BlockNumber first = 0;

	DropRelFileNodeBuffers(reln, &fork, 1, &first);
}

/*
 * Forget "invalid page" entries redo logged for our relations (it logs one
 * whenever it skips a block that does not exist yet); left alone they would
 * accumulate without bound.
 */
static void
forget_invalid_pages(void)
{
	if (!XLogHaveInvalidPages())
		return;
	for (int fork = 0; fork <= MAX_FORKNUM; fork++)
	{
		XLogDropRelation(scratch_rnode, fork);
		for (int i = 0; i < NUM_DUMMY_RELS; i++)
			XLogDropRelation(dummy_rnodes[i], fork);
	}
}

/* End the current request: nothing of it may outlive it. */
static void
finish_request(void)
{
	drop_relations(&scratch_rnode, 1);
	forget_invalid_pages();
	target.active = false;
	request_in_progress = false;

	if (pgBufferUsage.shared_blks_written != blocks_written_at_start)
		ereport(ERROR,
				(errcode(ERRCODE_INTERNAL_ERROR),
				 errmsg("walredod: a buffer was written to disk during redo; refusing to continue")));

	/*
	 * Redo must not write WAL of its own: with wal_log_hints on, a hint-bit
	 * change would log a page image into the scratch cluster and stamp the
	 * page with its LSN.
	 */
	if (GetXLogInsertRecPtr() != wal_insert_at_start)
		ereport(ERROR,
				(errcode(ERRCODE_INTERNAL_ERROR),
				 errmsg("walredod: redo wrote WAL into the scratch cluster; refusing to continue")));
}

/*
 * Load a block of ours into shared buffers as an initialised page whose LSN
 * is the highest possible.  Redo then gets a valid, pinnable buffer for it
 * that it considers already applied (BLK_DONE): it changes nothing, yet code
 * that uses the buffer's identity (BRIN takes BufferGetBlockNumber of the
 * heap page) sees the right block number.  The buffer is left unlocked and
 * unpinned, as routines that want a cleanup lock need to hold the only pin;
 * it is not marked dirty, so it can never be flushed.
 */
static Buffer
load_applied_page(RelFileNode rnode, ForkNumber fork, BlockNumber blkno)
{
	Buffer		buf;
	Page		page;

	buf = ReadBufferWithoutRelcache(rnode, fork, blkno, RBM_ZERO_AND_LOCK,
									NULL, true);
	page = BufferGetPage(buf);
	PageInit(page, BLCKSZ, 0);
	PageSetLSN(page, PG_UINT64_MAX);
	UnlockReleaseBuffer(buf);
	return buf;
}

/* Parse a wire block tag into the client's relation, fork and block. */
static void
parse_tag(const char *p, RelFileNode *rnode, ForkNumber *fork,
		  BlockNumber *blkno)
{
	uint8		forknum = (uint8) p[0];

	if (forknum > MAX_FORKNUM)
		ereport(ERROR,
				(errcode(ERRCODE_PROTOCOL_VIOLATION),
				 errmsg("walredod: invalid fork number %u in block tag",
						forknum)));
	*fork = (ForkNumber) forknum;
	rnode->spcNode = get_u32(p + 1);
	rnode->dbNode = get_u32(p + 5);
	rnode->relNode = get_u32(p + 9);
	*blkno = get_u32(p + 13);

	/*
	 * Our relations claim MaxBlockNumber blocks (see
	 * prepare_scratch_relations), so only blocks below it are inside them;
	 * PostgreSQL never uses it either.
	 */
	if (*blkno >= MaxBlockNumber)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("walredod: block number %u in block tag is not below %u",
						*blkno, MaxBlockNumber)));
}

static bool
is_target(RelFileNode rnode, ForkNumber fork, BlockNumber blkno)
{
	return RelFileNodeEquals(rnode, target.client_rnode) &&
		fork == target.client_fork && blkno == target.blkno;
}

/* Arenas larger than this are given back after their request. */
#define CHECKED_ARENA_KEEP	(8 * 1024 * 1024)

/*
 * Make an arena (in TopMemoryContext) hold at least 'needed' bytes; what it
 * held is not kept.
 */
static void
reserve_arena(char **arena, size_t *size, size_t needed)
{
	if (needed <= *size)
		return;
	if (*arena)
		pfree(*arena);
	*arena = NULL;
	*size = 0;
	*arena = MemoryContextAllocHuge(TopMemoryContext, needed);
	*size = needed;
}

/* Give back an arena a large request left above CHECKED_ARENA_KEEP. */
static void
trim_arena(char **arena, size_t *size)
{
	if (*size <= CHECKED_ARENA_KEEP)
		return;
	pfree(*arena);
	*arena = NULL;
	*size = 0;
}

/*
 * Where the target's decompressed images live while their request runs
 * (block_images.c): BLCKSZ bytes each, of one record only (the request's
 * first replayed one), so never more than XLR_MAX_BLOCK_ID + 1 pages.
 */
static char *image_arena;
static size_t image_arena_size;

/*
 * The first record of a request worth replaying: the last one that restores
 * a full image of the target, as nothing before it can change the result
 * (0 when none does).  Only that record's images of the target then need
 * decompressing, so a request of many tiny compressed images cannot make the
 * child hold a page for each.
 */
static int
first_record_to_replay(DecodedXLogRecord **records, int nrecords)
{
	for (int i = nrecords - 1; i > 0; i--)
		for (int id = 0; id <= records[i]->max_block_id; id++)
		{
			DecodedBkpBlock *blk = &records[i]->blocks[id];

			if (blk->in_use && blk->apply_image &&
				is_target(blk->rnode, blk->forknum, blk->blkno))
				return i;
		}
	return 0;
}

/*
 * Make the images redo will restore ready, before redo runs: the target's
 * checked and, when compressed, decompressed into image_arena; the other
 * blocks' blanked (block_images.c says why).  Images not to be applied are
 * left alone: redo ignores them.
 */
static void
prepare_block_images(DecodedXLogRecord **records, int nrecords)
{
	size_t		needed = 0;
	size_t		used = 0;

	for (int i = 0; i < nrecords; i++)
		for (int id = 0; id <= records[i]->max_block_id; id++)
		{
			DecodedBkpBlock *blk = &records[i]->blocks[id];

			if (blk->in_use && blk->apply_image &&
				block_image_is_compressed(blk) &&
				is_target(blk->rnode, blk->forknum, blk->blkno))
				needed += BLCKSZ;
		}
	reserve_arena(&image_arena, &image_arena_size, needed);

	for (int i = 0; i < nrecords; i++)
		for (int id = 0; id <= records[i]->max_block_id; id++)
		{
			DecodedBkpBlock *blk = &records[i]->blocks[id];

			if (!blk->in_use || !blk->apply_image)
				continue;
			if (!is_target(blk->rnode, blk->forknum, blk->blkno))
				blank_block_image(blk);
			else if (!block_image_is_compressed(blk))
				check_block_image(blk, id, records[i]->lsn);
			else
			{
				decompress_block_image(blk, image_arena + used, id,
									   records[i]->lsn);
				used += BLCKSZ;
			}
		}
}

/* Complain unless a tag names the block the current request rebuilds. */
static void
check_tag_is_target(const char *p, char msgtype)
{
	RelFileNode rnode;
	ForkNumber	fork;
	BlockNumber blkno;

	if (!target.active)
		ereport(ERROR,
				(errcode(ERRCODE_PROTOCOL_VIOLATION),
				 errmsg("walredod: '%c' message before any 'B' message",
						msgtype)));
	parse_tag(p, &rnode, &fork, &blkno);
	if (!is_target(rnode, fork, blkno))
		ereport(ERROR,
				(errcode(ERRCODE_PROTOCOL_VIOLATION),
				 errmsg("walredod: '%c' message names block %u/%u/%u fork %d blk %u, but redo began for %u/%u/%u fork %d blk %u",
						msgtype, rnode.spcNode, rnode.dbNode, rnode.relNode,
						fork, blkno,
						target.client_rnode.spcNode,
						target.client_rnode.dbNode,
						target.client_rnode.relNode,
						target.client_fork, target.blkno)));
}

static void start_target(RelFileNode rnode, ForkNumber fork,
						 BlockNumber blkno, const char *image);
static void load_target_image(const char *image);

/* The block a 'B' message names. */
static void
parse_begin(const char *body, uint32 len,
			RelFileNode *rnode, ForkNumber *fork, BlockNumber *blkno)
{
	if (len != WIRE_TAG_LEN)
		ereport(ERROR,
				(errcode(ERRCODE_PROTOCOL_VIOLATION),
				 errmsg("walredod: 'B' message body is %u bytes, expected %d",
						len, WIRE_TAG_LEN)));
	parse_tag(body, rnode, fork, blkno);
}

/* 'B': start rebuilding a block; it exists as zeros until a 'P' fills it. */
static void
begin_redo(const char *body, uint32 len)
{
	RelFileNode rnode;
	ForkNumber	fork;
	BlockNumber blkno;

	parse_begin(body, len, &rnode, &fork, &blkno);
	/* A request the client abandoned without 'G' ends here. */
	if (target.active)
		finish_request();
	start_target(rnode, fork, blkno, NULL);
}

/*
 * Start rebuilding a block from its base image, or from zeros when 'image'
 * is NULL (until a 'P' fills it, on the pipe without error replies).
 */
static void
start_target(RelFileNode rnode, ForkNumber fork, BlockNumber blkno,
			 const char *image)
{
	Buffer		buf;

	target.client_rnode = rnode;
	target.client_fork = fork;
	target.blkno = blkno;
	walredod_sandbox_probe(rnode.relNode);
	/* Init forks would be flushed at once by redo; keep them in main. */
	target.fork = fork == INIT_FORKNUM ? MAIN_FORKNUM : fork;
	target.active = true;
	request_in_progress = true;
	if (cpu_at_first_request_ns == 0)
		cpu_at_first_request_ns = cpu_time_ns();

	/*
	 * Give the target a buffer right away, so that no request reads it from
	 * disk; an all-zero page is what redo treats as "does not exist yet".
	 */
	open_scratch_rel(scratch_rnode);
	buf = ReadBufferWithoutRelcache(scratch_rnode, target.fork, target.blkno,
									RBM_ZERO_AND_LOCK, NULL, true);
	if (image != NULL)
	{
		memcpy(BufferGetPage(buf), image, BLCKSZ);
		MarkBufferDirty(buf);
	}
	else
		MemSet(BufferGetPage(buf), 0, BLCKSZ);
	UnlockReleaseBuffer(buf);
	target.buffer = buf;
}

/* 'P': the target's base image. */
static void
push_page(const char *body, uint32 len)
{
	if (len != WIRE_TAG_LEN + BLCKSZ)
		ereport(ERROR,
				(errcode(ERRCODE_PROTOCOL_VIOLATION),
				 errmsg("walredod: 'P' message body is %u bytes, expected %d (tag and one %d-byte page)",
						len, WIRE_TAG_LEN + BLCKSZ, BLCKSZ)));
	check_tag_is_target(body, 'P');
	load_target_image(body + WIRE_TAG_LEN);
}

/* Fill the target's page with its base image. */
static void
load_target_image(const char *image)
{
	Buffer		buf;

	buf = ReadBufferWithoutRelcache(scratch_rnode, target.fork, target.blkno,
									RBM_ZERO_AND_LOCK, NULL, true);
	memcpy(BufferGetPage(buf), image, BLCKSZ);
	MarkBufferDirty(buf);
	UnlockReleaseBuffer(buf);
	target.buffer = buf;
}

/* Only records of these kinds change relation pages and nothing else. */
static void
check_record_kind(XLogRecord *rec)
{
	uint8		info = rec->xl_info & ~XLR_INFO_MASK;

	switch (rec->xl_rmid)
	{
		case RM_XLOG_ID:
			if (info == XLOG_FPI || info == XLOG_FPI_FOR_HINT)
				return;
			break;
		case RM_HEAP2_ID:
			if ((info & XLOG_HEAP_OPMASK) == XLOG_HEAP2_REWRITE)
				break;
			return;
		case RM_HEAP_ID:
		case RM_BTREE_ID:
		case RM_HASH_ID:
		case RM_GIN_ID:
		case RM_GIST_ID:
		case RM_SEQ_ID:
		case RM_SPGIST_ID:
		case RM_BRIN_ID:
		case RM_GENERIC_ID:
			return;
		default:
			break;
	}
	if (RmgrIdIsValid(rec->xl_rmid) && RmgrIdExists(rec->xl_rmid))
		ereport(ERROR,
				(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
				 errmsg("walredod: %s record (info 0x%02X) does not change relation pages and cannot be applied to one",
						GetRmgr(rec->xl_rmid).rm_name, rec->xl_info)));
	ereport(ERROR,
			(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
			 errmsg("walredod: record has unknown resource manager id %u",
					rec->xl_rmid)));
}

/*
 * Does a block reference belong to the target's history?  A visibility map
 * page is also changed by heap records that only name the heap block whose
 * bits it holds, so those count for it.
 */
static bool
block_touches_target(DecodedBkpBlock *blk)
{
	if (is_target(blk->rnode, blk->forknum, blk->blkno))
		return true;
	return target.client_fork == VISIBILITYMAP_FORKNUM &&
		blk->forknum == MAIN_FORKNUM &&
		RelFileNodeEquals(blk->rnode, target.client_rnode) &&
		blk->blkno / VM_HEAPBLOCKS_PER_PAGE == target.blkno;
}

/*
 * Complain unless the record's block references are within our relations'
 * claimed size and one of them belongs to the target's history.
 */
static void
check_record_blocks(DecodedXLogRecord *record)
{
	bool		touches = false;

	for (int id = 0; id <= record->max_block_id; id++)
	{
		DecodedBkpBlock *blk = &record->blocks[id];

		if (!blk->in_use)
			continue;
		/* Past our relations' claimed size, redo would extend them on disk. */
		if (blk->blkno >= MaxBlockNumber)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("walredod: record's block %d has block number %u, not below %u",
							id, blk->blkno, MaxBlockNumber)));
		if (block_touches_target(blk))
			touches = true;
	}
	if (!touches)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("walredod: %s record does not reference the target block %u/%u/%u fork %d blk %u",
						GetRmgr(record->header.xl_rmid).rm_name,
						target.client_rnode.spcNode,
						target.client_rnode.dbNode,
						target.client_rnode.relNode,
						target.client_fork, target.blkno)));
}

/*
 * Point every block reference of the reader's current record at our
 * relations (checked already: check_record_blocks).  Returns the number of dummy relations
 * used, filling 'used'; sets *scratch_main_used when heap blocks of a
 * visibility-map target were mapped into the scratch relation.
 */
static int
remap_blocks(RelFileNode *used, bool *scratch_main_used)
{
	DecodedXLogRecord *record = reader->record;
	int			nused = 0;

	*scratch_main_used = false;
	for (int id = 0; id <= record->max_block_id; id++)
	{
		DecodedBkpBlock *blk = &record->blocks[id];

		if (!blk->in_use)
			continue;

		if (is_target(blk->rnode, blk->forknum, blk->blkno))
		{
			blk->rnode = scratch_rnode;
			blk->forknum = target.fork;
			blk->prefetch_buffer = target.buffer;
			continue;
		}

		/*
		 * Heap redo clears visibility map bits through the heap block's
		 * relation, so for a VM target the relation's heap blocks must share
		 * the scratch relation with it.
		 */
		if (target.client_fork == VISIBILITYMAP_FORKNUM &&
			blk->forknum == MAIN_FORKNUM &&
			RelFileNodeEquals(blk->rnode, target.client_rnode))
		{
			blk->rnode = scratch_rnode;
			*scratch_main_used = true;
		}
		else
		{
			blk->rnode = dummy_rnodes[id];
			used[nused++] = dummy_rnodes[id];
		}
		if (blk->forknum == INIT_FORKNUM)
			blk->forknum = MAIN_FORKNUM;

		open_scratch_rel(blk->rnode);
		if ((blk->flags & BKPBLOCK_WILL_INIT) == 0 && !blk->apply_image)
			blk->prefetch_buffer = load_applied_page(blk->rnode, blk->forknum,
													 blk->blkno);
	}
	return nused;
}

/* Pin the target's buffer, most often still the one 'B' loaded. */
static Buffer
pin_target(void)
{
	if (ReadRecentBuffer(scratch_rnode, target.fork, target.blkno,
						 target.buffer))
		return target.buffer;
	return ReadBufferWithoutRelcache(scratch_rnode, target.fork, target.blkno,
									 RBM_NORMAL_NO_LOG, NULL, true);
}

/*
 * Would heap visibility redo stamp the target page with the record's LSN on
 * a server that logs hint bits?  PostgreSQL's heap_xlog_visible does so for
 * the heap block (block 1) when XLogHintBitIsNeeded() and the block needs
 * redo; Neon's redo always does.  Our scratch cluster cannot run with
 * wal_log_hints on (redo's free space map updates would then write WAL of
 * their own), so when the WAL's source logged hint bits, or is Neon's, we
 * apply that one step ourselves.
 */
static bool
visible_needs_lsn_stamp(XLogRecPtr end_lsn)
{
	DecodedXLogRecord *record = reader->record;
	DecodedBkpBlock *heap_block;
	Buffer		buf;
	XLogRecPtr	page_lsn;

	if (!(walredod_source_logs_hint_bits ||
		  walredod_wal_format == WAL_FORMAT_NEON) ||
		record->header.xl_rmid != RM_HEAP2_ID ||
		(record->header.xl_info & XLOG_HEAP_OPMASK) != XLOG_HEAP2_VISIBLE ||
		record->max_block_id < 1)
		return false;
	heap_block = &record->blocks[1];
	if (!heap_block->in_use || heap_block->apply_image ||
		!RelFileNodeEquals(heap_block->rnode, scratch_rnode) ||
		heap_block->forknum != target.fork ||
		heap_block->blkno != target.blkno)
		return false;

	buf = pin_target();
	LockBuffer(buf, BUFFER_LOCK_SHARE);
	page_lsn = PageGetLSN(BufferGetPage(buf));
	UnlockReleaseBuffer(buf);
	return page_lsn < end_lsn;	/* else redo finds the block already done */
}

static void
stamp_target_lsn(XLogRecPtr end_lsn)
{
	Buffer		buf = pin_target();

	LockBuffer(buf, BUFFER_LOCK_EXCLUSIVE);
	PageSetLSN(BufferGetPage(buf), end_lsn);
	MarkBufferDirty(buf);
	UnlockReleaseBuffer(buf);
}

static void check_record_bytes(const char *rec, uint32 rec_len,
							   XLogRecPtr end_lsn);

/*
 * Check an 'A' message: its length, the record's own length and CRC, and that
 * the record's kind changes relation pages.  Returns the record (in place, it
 * may be unaligned) and sets its end LSN and length.
 */
static XLogRecord *
check_record_message(const char *body, uint32 len, XLogRecPtr *end_lsn,
					 uint32 *rec_len)
{
	XLogRecord *rec;

	if (!target.active)
		ereport(ERROR,
				(errcode(ERRCODE_PROTOCOL_VIOLATION),
				 errmsg("walredod: 'A' message before any 'B' message")));
	if (len < sizeof(uint64) + SizeOfXLogRecord)
		ereport(ERROR,
				(errcode(ERRCODE_PROTOCOL_VIOLATION),
				 errmsg("walredod: 'A' message body is %u bytes, too short for an LSN and a record header",
						len)));

	*end_lsn = get_u64(body);
	*rec_len = len - sizeof(uint64);
	rec = (XLogRecord *) (body + sizeof(uint64));
	check_record_bytes((const char *) rec, *rec_len, *end_lsn);
	return rec;
}

/*
 * Check a raw record of 'rec_len' bytes (possibly unaligned): its own length,
 * its CRC, and that its kind changes relation pages.
 */
static void
check_record_bytes(const char *rec, uint32 rec_len, XLogRecPtr end_lsn)
{
	XLogRecord	hdr;
	pg_crc32c	crc;

	if (rec_len < SizeOfXLogRecord)
		ereport(ERROR,
				(errcode(ERRCODE_DATA_CORRUPTED),
				 errmsg("walredod: record at end LSN %X/%X is %u bytes, shorter than a record header",
						LSN_FORMAT_ARGS(end_lsn), rec_len)));

	/* The record may sit unaligned in our input buffer; copy the header. */
	memcpy(&hdr, rec, SizeOfXLogRecord);
	if (hdr.xl_tot_len != rec_len)
		ereport(ERROR,
				(errcode(ERRCODE_DATA_CORRUPTED),
				 errmsg("walredod: record at end LSN %X/%X has xl_tot_len %u but the message carries %u bytes",
						LSN_FORMAT_ARGS(end_lsn), hdr.xl_tot_len, rec_len)));

	INIT_CRC32C(crc);
	COMP_CRC32C(crc, rec + SizeOfXLogRecord, rec_len - SizeOfXLogRecord);
	COMP_CRC32C(crc, (char *) &hdr, offsetof(XLogRecord, xl_crc));
	FIN_CRC32C(crc);
	if (!EQ_CRC32C(hdr.xl_crc, crc))
		ereport(ERROR,
				(errcode(ERRCODE_DATA_CORRUPTED),
				 errmsg("walredod: record at end LSN %X/%X fails its CRC check (stored %08X, computed %08X)",
						LSN_FORMAT_ARGS(end_lsn), hdr.xl_crc, crc)));
	check_record_kind(&hdr);
}

/* Make the decode buffer large enough for a record of 'rec_len' bytes. */
static void
reserve_decode_space(uint32 rec_len)
{
	size_t		needed = DecodeXLogRecordRequiredSpace(rec_len);

	if (needed <= decoded_size)
		return;
	pfree(decoded);
	decoded = (DecodedXLogRecord *) MemoryContextAllocHuge(TopMemoryContext,
														   needed);
	decoded_size = needed;
}

static void decode_into(DecodedXLogRecord *into, const char *rec,
						uint32 rec_len, XLogRecPtr end_lsn);

/*
 * Decode a checked record into 'decoded' and make it the reader's current
 * record.  Redo only uses the end position (EndRecPtr); the start is unknown
 * to us and is set to the same value.
 */
static void
decode_record(XLogRecord *rec, uint32 rec_len, XLogRecPtr end_lsn)
{
	reserve_decode_space(rec_len);
	decode_into(decoded, (const char *) rec, rec_len, end_lsn);
	reader->record = decoded;
	reader->ReadRecPtr = end_lsn;
	reader->EndRecPtr = end_lsn;
}

/*
 * Decode a checked record into 'into', which has room for it
 * (DecodeXLogRecordRequiredSpace).
 */
static void
decode_into(DecodedXLogRecord *into, const char *rec, uint32 rec_len,
			XLogRecPtr end_lsn)
{
	char	   *errormsg = NULL;

	/*
	 * DecodeXLogRecord copies what it keeps, but reads the record in place;
	 * give it an aligned copy when the input buffer did not.  The copy lives
	 * in redo_context, reset once the record is replayed (or the request
	 * checked).
	 */
	if (((uintptr_t) rec) % MAXIMUM_ALIGNOF != 0)
	{
		char	   *aligned = MemoryContextAllocHuge(redo_context, rec_len);

		memcpy(aligned, rec, rec_len);
		rec = aligned;
	}

	if (!DecodeXLogRecord(reader, into, (XLogRecord *) rec, end_lsn,
						  &errormsg))
		ereport(ERROR,
				(errcode(ERRCODE_DATA_CORRUPTED),
				 errmsg("walredod: record at end LSN %X/%X is malformed: %s",
						LSN_FORMAT_ARGS(end_lsn),
						errormsg ? errormsg : "unknown error")));
	into->next_lsn = end_lsn;
}

static XLogRecPtr
target_page_lsn(void)
{
	Buffer		buf = pin_target();
	XLogRecPtr	lsn;

	LockBuffer(buf, BUFFER_LOCK_SHARE);
	lsn = PageGetLSN(BufferGetPage(buf));
	UnlockReleaseBuffer(buf);
	return lsn;
}

/*
 * The block ids of the reader's current record (a bit each) that name the
 * target and whose tuples redo just wrote: not restored from an image, and
 * either initialised by the record or behind it by LSN before it (redo skips
 * a block that is not).
 */
static uint64
target_blocks_redone(XLogRecPtr lsn_before, XLogRecPtr lsn_after,
					 XLogRecPtr end_lsn)
{
	DecodedXLogRecord *record = reader->record;
	uint64		blocks = 0;

	if (lsn_after != end_lsn)
		return 0;
	for (int id = 0; id <= record->max_block_id; id++)
	{
		DecodedBkpBlock *blk = &record->blocks[id];

		if (!blk->in_use || blk->apply_image ||
			!RelFileNodeEquals(blk->rnode, scratch_rnode) ||
			blk->forknum != target.fork || blk->blkno != target.blkno)
			continue;
		if ((blk->flags & BKPBLOCK_WILL_INIT) || lsn_before < end_lsn)
			blocks |= UINT64CONST(1) << id;
	}
	return blocks;
}

/* Give the tuples redo wrote on the target Neon's t_cid and combo flag. */
static void
apply_neon_cid_fixes(XLogRecPtr lsn_before, XLogRecPtr end_lsn)
{
	Buffer		buf = pin_target();
	Page		page;
	uint64		redone;

	LockBuffer(buf, BUFFER_LOCK_EXCLUSIVE);
	page = BufferGetPage(buf);
	redone = target_blocks_redone(lsn_before, PageGetLSN(page), end_lsn);
	neon_apply_cid_fixes(page, redone);
	if (redone != 0)
		MarkBufferDirty(buf);
	UnlockReleaseBuffer(buf);
}

/* Run the resource manager's redo on the decoded, remapped record. */
static void
replay_record(XLogRecPtr end_lsn)
{
	bool		stamp_lsn = visible_needs_lsn_stamp(end_lsn);
	bool		fix_cids = neon_cid_fixes_pending();
	XLogRecPtr	lsn_before = fix_cids ? target_page_lsn() : InvalidXLogRecPtr;
	MemoryContext oldcontext;

	oldcontext = MemoryContextSwitchTo(redo_context);
	GetRmgr(reader->record->header.xl_rmid).rm_redo(reader);
	MemoryContextSwitchTo(oldcontext);
	if (fix_cids)
		apply_neon_cid_fixes(lsn_before, end_lsn);
	MemoryContextReset(redo_context);
	if (stamp_lsn)
		stamp_target_lsn(end_lsn);
}

/*
 * Pages of other blocks must not outlive the record: a stale one would answer
 * the next record's reads with content of this one.
 */
static void
release_record_blocks(RelFileNode *used, int nused, bool scratch_main_used)
{
	if (nused > 0)
		drop_relations(used, nused);
	if (scratch_main_used)
	{
		drop_scratch_fork(MAIN_FORKNUM);
		drop_scratch_fork(FSM_FORKNUM);
	}
	reader->record = NULL;
}

/* 'A': verify, decode and replay one record against the target. */
static void
apply_record(const char *body, uint32 len)
{
	XLogRecord *rec;
	XLogRecPtr	end_lsn;
	uint32		rec_len;
	RelFileNode used[NUM_DUMMY_RELS];
	bool		scratch_main_used;
	int			nused;

	rec = check_record_message(body, len, &end_lsn, &rec_len);
	decode_record(rec, rec_len, end_lsn);
	check_heap_record_format(decoded, end_lsn, walredod_wal_format);
	check_record_blocks(decoded);
	prepare_block_images(&decoded, 1);
	if (walredod_wal_format == WAL_FORMAT_NEON)
		neon_heap_record_to_vanilla(decoded, redo_context);
	nused = remap_blocks(used, &scratch_main_used);
	replay_record(end_lsn);
	release_record_blocks(used, nused, scratch_main_used);
	stat_records++;
}

/*
 * The records of the request check_redo_request accepted last, decoded into
 * one arena for run_redo_request, so that nothing is decoded twice.
 */
static char *checked_arena;
static size_t checked_arena_size;
static DecodedXLogRecord **checked_records;
static int	checked_records_size;
static int	checked_first_replayed;	/* first_record_to_replay of them */

/*
 * SQLSTATEs of refusals that say the request itself is wrong (the others
 * are ours: out of memory while checking, say).
 */
bool
is_invalid_request_sqlstate(int sqlerrcode)
{
	return sqlerrcode == ERRCODE_PROTOCOL_VIOLATION ||
		sqlerrcode == ERRCODE_DATA_CORRUPTED ||
		sqlerrcode == ERRCODE_FEATURE_NOT_SUPPORTED ||
		sqlerrcode == ERRCODE_INVALID_PARAMETER_VALUE ||
		sqlerrcode == ERRCODE_WALREDOD_WAL_FORMAT_MISMATCH;
}

/*
 * Check a whole request before redo touches anything: the tag, every
 * record's length, CRC, kind and block references, and the order of the
 * LSNs.  Refusals are ERRORs the caller may catch: nothing but the target's
 * identity and the arena of decoded records has changed.
 */
void
check_redo_request(const RedoRequest *req)
{
	XLogRecPtr	previous = InvalidXLogRecPtr;
	size_t		total = 0;
	size_t		offset = 0;

	Assert(!target.active);
	if (req->fork < 0 || req->fork > MAX_FORKNUM)
		ereport(ERROR,
				(errcode(ERRCODE_PROTOCOL_VIOLATION),
				 errmsg("walredod: invalid fork number %d in block tag",
						(int) req->fork)));
	if (req->blkno >= MaxBlockNumber)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("walredod: block number %u in block tag is not below %u",
						req->blkno, MaxBlockNumber)));
	target.client_rnode = req->rnode;
	target.client_fork = req->fork;
	target.blkno = req->blkno;

	for (int i = 0; i < req->nrecords; i++)
	{
		const RedoRequestRecord *r = &req->records[i];

		check_record_bytes(r->data, r->len, r->end_lsn);
		if (r->end_lsn < previous)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("walredod: record %d ends at %X/%X, before the record ahead of it (%X/%X)",
							i, LSN_FORMAT_ARGS(r->end_lsn),
							LSN_FORMAT_ARGS(previous))));
		previous = r->end_lsn;
		total += MAXALIGN(DecodeXLogRecordRequiredSpace(r->len));
	}
	if (previous > req->lsn)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("walredod: a record ends at %X/%X, after the requested LSN %X/%X",
						LSN_FORMAT_ARGS(previous), LSN_FORMAT_ARGS(req->lsn))));

	reserve_arena(&checked_arena, &checked_arena_size, total);
	if (req->nrecords > checked_records_size)
	{
		int			size = Max(req->nrecords, 2 * checked_records_size);

		if (checked_records)
			pfree(checked_records);
		checked_records = NULL;
		checked_records_size = 0;
		checked_records = MemoryContextAllocHuge(TopMemoryContext,
												 size * sizeof(DecodedXLogRecord *));
		checked_records_size = size;
	}

	for (int i = 0; i < req->nrecords; i++)
	{
		const RedoRequestRecord *r = &req->records[i];
		DecodedXLogRecord *record = (DecodedXLogRecord *) (checked_arena + offset);

		offset += MAXALIGN(DecodeXLogRecordRequiredSpace(r->len));
		decode_into(record, r->data, r->len, r->end_lsn);
		check_heap_record_format(record, r->end_lsn, walredod_wal_format);
		check_record_blocks(record);
		checked_records[i] = record;
	}
	checked_first_replayed = first_record_to_replay(checked_records,
													req->nrecords);
	prepare_block_images(checked_records + checked_first_replayed,
						 req->nrecords - checked_first_replayed);
	MemoryContextReset(redo_context);
}

/*
 * Check a whole request before redo touches anything.  A refusal is returned,
 * copied out of the error state, rather than raised: the child answers it and
 * serves on.  NULL: the request may run.  'prepare', when given, builds the
 * request first; its errors are refusals too.
 */
ErrorData *
refusal_of_request(RedoRequest *req, void (*prepare) (RedoRequest *req, int arg),
				   int arg)
{
	MemoryContext oldcontext = CurrentMemoryContext;
	ErrorData  *volatile refusal = NULL;

	PG_TRY();
	{
		if (prepare != NULL)
			prepare(req, arg);
		/* What the checks allocate (reasons, aligned copies) is theirs. */
		MemoryContextSwitchTo(redo_context);
		check_redo_request(req);
		MemoryContextSwitchTo(oldcontext);
	}
	PG_CATCH();
	{
		MemoryContextSwitchTo(oldcontext);
		refusal = CopyErrorData();
		FlushErrorState();
		MemoryContextReset(redo_context);
		trim_arena(&checked_arena, &checked_arena_size);
	}
	PG_END_TRY();
	return refusal;
}

/*
 * Rebuild the page of a request check_redo_request accepted, into 'page'
 * (BLCKSZ bytes); returns how many of its records were replayed (those from
 * its last full image of the page on).  An ERROR here is a redo failure: it
 * ends the process.
 */
int
run_redo_request(const RedoRequest *req, char *page)
{
	start_target(req->rnode, req->fork, req->blkno, req->image);
	for (int i = checked_first_replayed; i < req->nrecords; i++)
	{
		XLogRecPtr	end_lsn = req->records[i].end_lsn;
		RelFileNode used[NUM_DUMMY_RELS];
		bool		scratch_main_used;
		int			nused;

		reader->record = checked_records[i];
		reader->ReadRecPtr = end_lsn;
		reader->EndRecPtr = end_lsn;
		if (walredod_wal_format == WAL_FORMAT_NEON)
			neon_heap_record_to_vanilla(reader->record, redo_context);
		nused = remap_blocks(used, &scratch_main_used);
		replay_record(end_lsn);
		release_record_blocks(used, nused, scratch_main_used);
		stat_records++;
	}
	copy_target_page(page);
	finish_request();
	stat_requests++;

	trim_arena(&checked_arena, &checked_arena_size);
	return req->nrecords - checked_first_replayed;
}

static void
write_all(const char *data, size_t len)
{
	size_t		done = 0;

	while (done < len)
	{
		ssize_t		n = write(reply_fd, data + done, len - done);

		if (n < 0)
		{
			if (errno == EINTR)
				continue;
			ereport(ERROR,
					(errcode_for_file_access(),
					 errmsg("walredod: could not write reply: %m")));
		}
		done += n;
	}
}

static void
write_reply(const char *page)
{
	write_all(page, BLCKSZ);
}

/* 'G': reply with the rebuilt page, then forget the request. */
static void
get_page(const char *body, uint32 len)
{
	PGAlignedBlock page;

	if (len != WIRE_TAG_LEN)
		ereport(ERROR,
				(errcode(ERRCODE_PROTOCOL_VIOLATION),
				 errmsg("walredod: 'G' message body is %u bytes, expected %d",
						len, WIRE_TAG_LEN)));
	check_tag_is_target(body, 'G');

	copy_target_page(page.data);
	write_reply(page.data);
	finish_request();

	stat_requests++;
}

/* Copy the rebuilt page out of its buffer. */
static void
copy_target_page(char *page)
{
	Buffer		buf = pin_target();

	LockBuffer(buf, BUFFER_LOCK_SHARE);
	memcpy(page, BufferGetPage(buf), BLCKSZ);
	UnlockReleaseBuffer(buf);
}

/* 'H': reply with a page of zeros. */
static void
ping(uint32 len)
{
	PGAlignedBlock zeros;

	if (len != 0)
		ereport(ERROR,
				(errcode(ERRCODE_PROTOCOL_VIOLATION),
				 errmsg("walredod: 'H' message has a %u-byte body, expected none",
						len)));
	MemSet(zeros.data, 0, BLCKSZ);
	if (walredod_pipe_error_replies)
	{
		char		status = PIPE_REPLY_OK;

		write_all(&status, 1);
	}
	write_reply(zeros.data);
}

/* Where a message of a whole request on stdin sits, from inbuf_start. */
typedef struct PipeMessage
{
	char		type;
	size_t		body;			/* offset of its body */
	uint32		len;			/* length of its body */
} PipeMessage;

static PipeMessage *pipe_messages;
static int	pipe_messages_size;
static RedoRequestRecord *pipe_records;
static int	pipe_records_size;
static char pipe_reply[1 + BLCKSZ];

/* Complain unless a message's body starts with the block tag 'tag'. */
static void
check_same_tag(const PipeMessage *m, const char *tag)
{
	RelFileNode rnode,
				began_rnode;
	ForkNumber	fork,
				began_fork;
	BlockNumber blkno,
				began_blkno;

	if (memcmp(inbuf + inbuf_start + m->body, tag, WIRE_TAG_LEN) == 0)
		return;
	parse_tag(tag, &began_rnode, &began_fork, &began_blkno);
	parse_tag(inbuf + inbuf_start + m->body, &rnode, &fork, &blkno);
	ereport(ERROR,
			(errcode(ERRCODE_PROTOCOL_VIOLATION),
			 errmsg("walredod: '%c' message names block %u/%u/%u fork %d blk %u, but redo began for %u/%u/%u fork %d blk %u",
					m->type, rnode.spcNode, rnode.dbNode, rnode.relNode,
					fork, blkno, began_rnode.spcNode, began_rnode.dbNode,
					began_rnode.relNode, began_fork, began_blkno)));
}

/* Turn the messages of a whole request into 'req' (records in place). */
static void
build_pipe_request(RedoRequest *req, int nmessages)
{
	const char *base = inbuf + inbuf_start;
	const char *tag = base + pipe_messages[0].body;
	int			nrecords = 0;

	parse_tag(tag, &req->rnode, &req->fork, &req->blkno);
	req->image = NULL;
	for (int i = 1; i < nmessages; i++)
	{
		const PipeMessage *m = &pipe_messages[i];
		const char *body = base + m->body;

		switch (m->type)
		{
			case 'P':
				if (m->len != WIRE_TAG_LEN + BLCKSZ)
					ereport(ERROR,
							(errcode(ERRCODE_PROTOCOL_VIOLATION),
							 errmsg("walredod: 'P' message body is %u bytes, expected %d (tag and one %d-byte page)",
									m->len, WIRE_TAG_LEN + BLCKSZ, BLCKSZ)));
				if (i != 1)
					ereport(ERROR,
							(errcode(ERRCODE_PROTOCOL_VIOLATION),
							 errmsg("walredod: a 'P' message comes right after 'B', this one is message %d",
									i)));
				check_same_tag(m, tag);
				req->image = body + WIRE_TAG_LEN;
				break;
			case 'A':
				if (m->len < sizeof(uint64) + SizeOfXLogRecord)
					ereport(ERROR,
							(errcode(ERRCODE_PROTOCOL_VIOLATION),
							 errmsg("walredod: 'A' message body is %u bytes, too short for an LSN and a record header",
									m->len)));
				pipe_records[nrecords].end_lsn = get_u64(body);
				pipe_records[nrecords].data = body + sizeof(uint64);
				pipe_records[nrecords].len = m->len - sizeof(uint64);
				nrecords++;
				break;
			case 'G':
				if (m->len != WIRE_TAG_LEN)
					ereport(ERROR,
							(errcode(ERRCODE_PROTOCOL_VIOLATION),
							 errmsg("walredod: 'G' message body is %u bytes, expected %d",
									m->len, WIRE_TAG_LEN)));
				check_same_tag(m, tag);
				break;
		}
	}
	req->nrecords = nrecords;
	req->records = pipe_records;
	/* The pipe names no LSN of its own: the last record's end is the one. */
	req->lsn = nrecords > 0 ? pipe_records[nrecords - 1].end_lsn : InvalidXLogRecPtr;
}

/*
 * 'B' with error replies: read the request whole, check it, and answer it
 * with the page or with why it was refused.
 */
static void
serve_whole_pipe_request(void)
{
	size_t		pos = 0;
	int			nmessages = 0;
	RedoRequest req;
	ErrorData  *refusal;

	/*
	 * A 'B' that is not a good block tag ends the process as without error
	 * replies: which messages would belong to its request is not clear.
	 */
	{
		RelFileNode rnode;
		ForkNumber	fork;
		BlockNumber blkno;

		parse_begin(inbuf + inbuf_start + MSG_HEADER_LEN,
					get_u32(inbuf + inbuf_start + 1) - MSG_LENGTH_FIELD_LEN,
					&rnode, &fork, &blkno);
	}

	for (;;)
	{
		char		msgtype;
		uint32		msglen;

		fill_input(pos + MSG_HEADER_LEN, false);
		msgtype = inbuf[inbuf_start + pos];
		msglen = get_u32(inbuf + inbuf_start + pos + 1);
		if (msglen < MSG_LENGTH_FIELD_LEN || msglen > MAX_MESSAGE_LEN)
			ereport(ERROR,
					(errcode(ERRCODE_PROTOCOL_VIOLATION),
					 errmsg("walredod: message '%c' has invalid length %u",
							msgtype, msglen)));
		/* Our engine sends B, P?, A*, G: anything else is lost framing. */
		if (nmessages > 0 && msgtype != 'P' && msgtype != 'A' && msgtype != 'G')
			ereport(ERROR,
					(errcode(ERRCODE_PROTOCOL_VIOLATION),
					 errmsg("walredod: message type 0x%02X inside a request",
							(unsigned char) msgtype)));
		fill_input(pos + MSG_HEADER_LEN + msglen - MSG_LENGTH_FIELD_LEN, false);
		if (nmessages == pipe_messages_size)
		{
			int			size = Max(64, 2 * pipe_messages_size);

			pipe_messages = pipe_messages == NULL ?
				MemoryContextAllocHuge(TopMemoryContext, size * sizeof(PipeMessage)) :
				repalloc_huge(pipe_messages, size * sizeof(PipeMessage));
			pipe_records = pipe_records == NULL ?
				MemoryContextAllocHuge(TopMemoryContext, size * sizeof(RedoRequestRecord)) :
				repalloc_huge(pipe_records, size * sizeof(RedoRequestRecord));
			pipe_messages_size = pipe_records_size = size;
		}
		pipe_messages[nmessages].type = msgtype;
		pipe_messages[nmessages].body = pos + MSG_HEADER_LEN;
		pipe_messages[nmessages].len = msglen - MSG_LENGTH_FIELD_LEN;
		nmessages++;
		pos += MSG_HEADER_LEN + msglen - MSG_LENGTH_FIELD_LEN;
		if (msgtype == 'G')
			break;
	}

	/* Refused here, nothing was touched: answer and carry on. */
	refusal = refusal_of_request(&req, build_pipe_request, nmessages);
	if (refusal != NULL)
	{
		char	   *message = psprintf("%s (ERROR %s)", refusal->message,
									   unpack_sql_state(refusal->sqlerrcode));
		uint32		len = strlen(message);
		char	   *reply = palloc(1 + 4 + len);
		int			sqlstate = refusal->sqlerrcode;

		reply[0] = is_invalid_request_sqlstate(sqlstate) ?
			PIPE_REPLY_INVALID : PIPE_REPLY_INTERNAL;
		reply[1] = (char) (len >> 24);
		reply[2] = (char) (len >> 16);
		reply[3] = (char) (len >> 8);
		reply[4] = (char) len;
		memcpy(reply + 5, message, len);
		write_all(reply, 5 + len);
		pfree(reply);
		pfree(message);
		FreeErrorData(refusal);
	}
	else
	{
		/* From here on an error is a redo failure, and ends the process. */
		run_redo_request(&req, pipe_reply + 1);
		pipe_reply[0] = PIPE_REPLY_OK;
		write_all(pipe_reply, sizeof(pipe_reply));
	}
	inbuf_start += pos;

	/* A large request's input buffer is given back once nothing is left. */
	if (inbuf_start == inbuf_end && inbuf_size > INBUF_KEEP)
	{
		char	   *small = MemoryContextAllocExtended(TopMemoryContext, INBUF_INITIAL,
													   MCXT_ALLOC_NO_OOM);

		if (small != NULL)
		{
			pfree(inbuf);
			inbuf = small;
			inbuf_size = INBUF_INITIAL;
			inbuf_start = inbuf_end = 0;
		}
	}
}

/*
 * Make sure the input buffer holds at least 'want' unconsumed bytes.
 * Returns false on EOF before any byte of a new message.
 */
static bool
fill_input(size_t want, bool at_message_start)
{
	while (inbuf_end - inbuf_start < want)
	{
		ssize_t		n;

		if (inbuf_start + want > inbuf_size)
		{
			/* Slide the partial message down, growing the buffer if needed. */
			size_t		have = inbuf_end - inbuf_start;

			if (want > inbuf_size)
			{
				size_t		newsize = Max(inbuf_size * 2, want);
				char	   *newbuf;

				newbuf = MemoryContextAllocHuge(TopMemoryContext, newsize);

				memcpy(newbuf, inbuf + inbuf_start, have);
				pfree(inbuf);
				inbuf = newbuf;
				inbuf_size = newsize;
			}
			else
				memmove(inbuf, inbuf + inbuf_start, have);
			inbuf_start = 0;
			inbuf_end = have;
		}

		n = read(STDIN_FILENO, inbuf + inbuf_end, inbuf_size - inbuf_end);
		if (n < 0)
		{
			if (errno == EINTR)
				continue;
			ereport(ERROR,
					(errcode_for_file_access(),
					 errmsg("walredod: could not read from stdin: %m")));
		}
		if (n == 0)
		{
			if (at_message_start && inbuf_end == inbuf_start)
				return false;
			ereport(ERROR,
					(errcode(ERRCODE_PROTOCOL_VIOLATION),
					 errmsg("walredod: stdin ended in the middle of a message")));
		}
		inbuf_end += n;
	}
	return true;
}

/*
 * poll(), but a wait for input first polls without blocking, giving the CPU
 * to whoever wants it in between, for up to walredod.spin_wait_us.  A peer on
 * another CPU then finds us awake: waking a process whose CPU went idle costs
 * more than a short request on these VMs.  A peer on our own CPU runs when we
 * yield, so spinning costs it little.
 */
int
poll_spinning(struct pollfd *fds, nfds_t nfds, int timeout)
{
	if (timeout != 0 && walredod_spin_wait_us > 0)
	{
		struct timespec start;
		struct timespec now;

		clock_gettime(CLOCK_MONOTONIC, &start);
		for (;;)
		{
			int			n = poll(fds, nfds, 0);

			if (n != 0)
				return n;
			clock_gettime(CLOCK_MONOTONIC, &now);
			if ((now.tv_sec - start.tv_sec) * 1000000 +
				(now.tv_nsec - start.tv_nsec) / 1000 >= walredod_spin_wait_us)
				break;
			sched_yield();
		}
	}
	return poll(fds, nfds, timeout);
}

static void
exit_on_eof(void)
{
	uint64		cpu_ns = 0;

	if (target.active)
		finish_request();
	if (cpu_at_first_request_ns != 0)
		cpu_ns = cpu_time_ns() - cpu_at_first_request_ns;
	fprintf(stderr,
			"walredod: served %llu requests, %llu records, %llu ns of CPU time\n",
			(unsigned long long) stat_requests,
			(unsigned long long) stat_records,
			(unsigned long long) cpu_ns);
	InRecovery = false;
	proc_exit(0);
}

static void
serve(void)
{
	for (;;)
	{
		char		msgtype;
		uint32		msglen;
		uint32		bodylen;
		const char *body;

		/*
		 * Between requests on stdin, serve local clients until it has more
		 * (or, without any, wait for it spinning first).
		 */
		if (!target.active && inbuf_end == inbuf_start)
		{
			if (local_server_listen_fd() >= 0)
				local_server_serve_until_stdin();
			else if (walredod_spin_wait_us > 0)
			{
				struct pollfd stdin_fd = {.fd = STDIN_FILENO,.events = POLLIN};

				poll_spinning(&stdin_fd, 1, -1);
			}
		}
		if (!fill_input(MSG_HEADER_LEN, true))
			exit_on_eof();
		msgtype = inbuf[inbuf_start];
		msglen = get_u32(inbuf + inbuf_start + 1);
		if (msglen < MSG_LENGTH_FIELD_LEN || msglen > MAX_MESSAGE_LEN)
			ereport(ERROR,
					(errcode(ERRCODE_PROTOCOL_VIOLATION),
					 errmsg("walredod: message '%c' has invalid length %u",
							msgtype, msglen)));
		bodylen = msglen - MSG_LENGTH_FIELD_LEN;
		fill_input(MSG_HEADER_LEN + (size_t) bodylen, false);
		body = inbuf + inbuf_start + MSG_HEADER_LEN;

		switch (msgtype)
		{
			case 'B':
				if (walredod_pipe_error_replies)
				{
					serve_whole_pipe_request();
					continue;	/* it consumed the request */
				}
				begin_redo(body, bodylen);
				break;
			case 'P':
				push_page(body, bodylen);
				break;
			case 'A':
				apply_record(body, bodylen);
				break;
			case 'G':
				get_page(body, bodylen);
				break;
			case 'H':
				ping(bodylen);
				break;
			default:
				ereport(ERROR,
						(errcode(ERRCODE_PROTOCOL_VIOLATION),
						 errmsg("walredod: unknown message type 0x%02X",
								(unsigned char) msgtype)));
		}
		inbuf_start += MSG_HEADER_LEN + (size_t) bodylen;
	}
}

/*
 * Dying with dirty buffers of ours must not run the shutdown checkpoint: it
 * would try to flush pages stamped with the client's LSNs.
 */
static void
skip_shutdown_if_busy(int code, Datum arg)
{
	if (request_in_progress)
	{
		fflush(stderr);
		_exit(code == 0 ? 1 : code);
	}
}

/*
 * Replies go to the original stdout; stray prints go to stderr.  The parent
 * stops us with SIGKILL or by closing stdin; SIGINT from a terminal belongs
 * to the parent.  A dying child must not dump core, nor checkpoint.
 */
static void
detach_from_terminal(void)
{
	struct rlimit no_core = {0, 0};

	fflush(stdout);
	reply_fd = dup(STDOUT_FILENO);
	if (reply_fd < 0 || dup2(STDERR_FILENO, STDOUT_FILENO) < 0)
		ereport(FATAL,
				(errcode_for_file_access(),
				 errmsg("walredod: could not redirect stdout: %m")));

	pqsignal(SIGINT, SIG_IGN);
	pqsignal(SIGHUP, SIG_IGN);
	pqsignal(SIGTERM, SIG_DFL);
	pqsignal(SIGQUIT, SIG_DFL);
	setrlimit(RLIMIT_CORE, &no_core);

	before_shmem_exit(skip_shutdown_if_busy, 0);
}

/* Allocate what serving requests needs for the life of the process. */
static void
allocate_serving_state(void)
{
	CurrentResourceOwner = ResourceOwnerCreate(NULL, "walredod");
	redo_context = AllocSetContextCreate(TopMemoryContext, "walredod record",
										 ALLOCSET_DEFAULT_SIZES);
	MemoryContextSwitchTo(TopMemoryContext);

	inbuf_size = INBUF_INITIAL;
	inbuf = MemoryContextAllocHuge(TopMemoryContext, inbuf_size);
	inbuf_start = inbuf_end = 0;

	reader = XLogReaderAllocate(wal_segment_size, NULL,
								XL_ROUTINE(.page_read = NULL), NULL);
	if (reader == NULL)
		ereport(FATAL,
				(errcode(ERRCODE_OUT_OF_MEMORY),
				 errmsg("walredod: out of memory allocating a WAL reader")));
	decoded_size = DecodeXLogRecordRequiredSpace(BLCKSZ * 4);
	decoded = MemoryContextAllocHuge(TopMemoryContext, decoded_size);
	block_images_init();
}

/*
 * Recovery state: InRecovery makes smgr trust our cached sizes and md
 * zero-fill reads past EOF; without reachedConsistency a skipped block is
 * remembered instead of being a PANIC; no hot standby conflicts.
 */
static void
enter_recovery(void)
{
	InRecovery = true;
	reachedConsistency = false;
	standbyState = STANDBY_DISABLED;
	RmgrStartup();
}

/* Put the backend into the state redo expects, then serve forever. */
static void
take_over(void)
{
	detach_from_terminal();
	allocate_serving_state();
	local_server_start();
	enter_recovery();

	/*
	 * Hostile input may follow: nothing outside the datadir from here on.
	 * The local data path's listening socket is the one that may accept.
	 */
	walredod_sandbox_enter(local_server_listen_fd());

	PG_TRY();
	{
		prepare_scratch_relations();
		blocks_written_at_start = pgBufferUsage.shared_blks_written;
		wal_insert_at_start = GetXLogInsertRecPtr();
		serve();
	}
	PG_CATCH();
	{
		/* Report, and end without touching anything on disk. */
		EmitErrorReport();
		fflush(stderr);
		_exit(1);
	}
	PG_END_TRY();
}

void
_PG_init(void)
{
	DefineCustomBoolVariable("walredod.serve",
							 "Serve the WAL redo protocol on stdin/stdout.",
							 "Only for a single-user backend started by walredod.",
							 &walredod_serve,
							 false,
							 PGC_SU_BACKEND,
							 0,
							 NULL, NULL, NULL);

	DefineCustomBoolVariable("walredod.source_logs_hint_bits",
							 "The WAL comes from a cluster with wal_log_hints or data checksums.",
							 "Heap visibility records then stamp the heap page with their LSN.",
							 &walredod_source_logs_hint_bits,
							 false,
							 PGC_SU_BACKEND,
							 0,
							 NULL, NULL, NULL);

	DefineCustomEnumVariable("walredod.wal_format",
							 "Heap record format of the WAL: vanilla or neon.",
							 "neon: WAL from a Neon compute, whose heap records carry the command id.",
							 &walredod_wal_format,
							 WAL_FORMAT_VANILLA,
							 wal_format_options,
							 PGC_SU_BACKEND,
							 0,
							 NULL, NULL, NULL);

	DefineCustomBoolVariable("walredod.pipe_error_replies",
							 "Answer a refused request on stdin with an error reply instead of exiting.",
							 "Every reply then starts with a status byte (walredod's engine, not Neon's protocol).",
							 &walredod_pipe_error_replies,
							 false,
							 PGC_SU_BACKEND,
							 0,
							 NULL, NULL, NULL);
	DefineCustomIntVariable("walredod.spin_wait_us",
							"Microseconds a wait for the next request polls before it sleeps.",
							"A client on another CPU then finds the child awake (0: sleep at once).",
							&walredod_spin_wait_us,
							0, 0, 1000000,
							PGC_SU_BACKEND,
							0,
							NULL, NULL, NULL);
	local_server_define_gucs();
	walredod_sandbox_define_gucs();
	MarkGUCPrefixReserved("walredod");

	if (!walredod_serve)
		return;
	if (IsUnderPostmaster)
		ereport(FATAL,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("walredod.serve requires a single-user backend (postgres --single)")));
	take_over();
}
