/*-------------------------------------------------------------------------
 *
 * wal_format.c
 *		The two PostgreSQL 15 heap record formats walredod serves, told apart
 *		before redo touches anything, and Neon's served on stock redo.
 *
 * Neon's compute runs a patched PostgreSQL 15 that keeps the rmgr ids and
 * record kinds but puts the command id (t_cid) into five structs: the tuple
 * header of inserts and updates (9 bytes instead of 5), the per-tuple header
 * of multi-inserts (13 instead of 7), and the main data of delete, lock (14
 * instead of 8) and update (18 instead of 14).  Its redo then stores the
 * logged t_cid where stock redo stores FirstCommandId, and takes the combo
 * flag (HEAP_COMBOCID) from the record: from a new bit (0x20) of the
 * infobits of delete, update, lock and lock-updated records, and as logged
 * in inserted tuples' infomask.  Stock redo clears that flag everywhere
 * except on lock-updated tuples, which it leaves alone.
 *
 * Nothing in a record names its format.  A tuple header tells: PostgreSQL
 * always gives a tuple t_hoff = MAXALIGN(23 + null bitmap), and read in the
 * wrong layout the byte at t_hoff's place is something else (the low byte
 * of t_cid, or tuple data).  Main-data lengths tell for delete, lock and
 * update.
 *
 * Under walredod.wal_format = neon, a record is rewritten in the decoded
 * record into the vanilla layout (the t_cid fields taken out), stock redo
 * applies it, and then the t_cid and HEAP_COMBOCID of each tuple the redo
 * wrote on the target page are set as Neon's redo sets them.  Stock and
 * Neon redo do the same thing otherwise, and neither reads those two fields
 * after writing them, so the page is the one Neon's redo makes.
 *
 * Copyright (c) 2026, the walredod developers.
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/heapam_xlog.h"
#include "access/htup_details.h"
#include "access/rmgr.h"
#include "access/xlog_internal.h"

#include "wal_format.h"

const struct config_enum_entry wal_format_options[] = {
	{"vanilla", WAL_FORMAT_VANILLA, false},
	{"neon", WAL_FORMAT_NEON, false},
	{NULL, 0, false}
};

/*
 * Where the fields format checks need sit in each format's heap records.
 * xl_heap_lock has the layout of xl_heap_delete in both formats.
 */
typedef struct HeapRecordLayout
{
	const char *setting;		/* walredod.wal_format value */
	const char *writer;			/* who writes this format */
	int			header_size;	/* xl_heap_header as logged */
	int			header_hoff;	/* offset of its t_hoff */
	int			multi_size;		/* xl_multi_insert_tuple as logged */
	int			multi_hoff;		/* offset of its t_hoff */
	int			delete_size;	/* xl_heap_delete, xl_heap_lock */
	int			delete_infobits;	/* offset of their infobits_set */
	int			delete_flags;	/* offset of their flags */
	int			update_size;	/* xl_heap_update */
} HeapRecordLayout;

static const HeapRecordLayout layouts[] = {
	[WAL_FORMAT_VANILLA] = {
		"vanilla", "vanilla PostgreSQL 15",
		5, 4, 7, 6, 8, 6, 7, 14
	},
	[WAL_FORMAT_NEON] = {
		"neon", "a Neon compute (PostgreSQL 15)",
		9, 8, 13, 12, 14, 12, 13, 18
	},
};

/* Offsets only Neon's layout has. */
#define NEON_HEADER_CID			4	/* t_cid in xl_heap_header */
#define NEON_MULTI_CID			8	/* t_cid in xl_multi_insert_tuple */
#define NEON_DELETE_CID			8	/* t_cid in xl_heap_delete, _lock */
#define NEON_UPDATE_CID			8	/* t_cid in xl_heap_update */
#define NEON_UPDATE_NEW_XMAX	12	/* new_xmax, then new_offnum */
/* The infobits bit Neon adds: the tuple's t_cid is a combo id. */
#define NEON_XLHL_COMBOCID		0x20

/* Fields both formats keep in place. */
#define UPDATE_OLD_OFFNUM		4
#define UPDATE_OLD_INFOBITS		6
#define UPDATE_FLAGS			7
#define DELETE_OFFNUM			4
#define LOCK_UPDATED_OFFNUM		4
#define LOCK_UPDATED_INFOBITS	6
#define MULTI_INSERT_NTUPLES	2
#define MULTI_INSERT_OFFSETS	4

/*
 * What Neon's redo sets on one tuple beyond stock redo: the tuple at
 * 'offnum' on the page of block reference 'block_id'.
 */
typedef struct CidFix
{
	uint8		block_id;
	OffsetNumber offnum;
	bool		set_cid;		/* else t_cid stays as stock redo left it */
	CommandId	cid;
	bool		combo;			/* HEAP_COMBOCID afterwards */
} CidFix;

/* A multi-insert fills at most a page; an update touches two tuples. */
#define MAX_CID_FIXES	(MaxHeapTuplesPerPage + 2)

static CidFix cid_fixes[MAX_CID_FIXES];
static int	ncid_fixes = 0;


static inline uint16
read_u16(const char *p)
{
	uint16		v;

	memcpy(&v, p, sizeof(v));
	return v;
}

static inline uint32
read_u32(const char *p)
{
	uint32		v;

	memcpy(&v, p, sizeof(v));
	return v;
}

/* The t_hoff PostgreSQL gives a tuple: its header and null bitmap. */
static int
expected_hoff(uint16 infomask2, uint16 infomask)
{
	int			len = SizeofHeapTupleHeader;

	if (infomask & HEAP_HASNULL)
		len += BITMAPLEN(infomask2 & HEAP_NATTS_MASK);
	return MAXALIGN(len);
}

static void refuse_record(DecodedXLogRecord *record, XLogRecPtr end_lsn,
						  WalFormat format, const char *why)
			pg_attribute_noreturn();

/*
 * Report a record that is not in 'format', naming the setting for the
 * other one.
 */
static void
refuse_record(DecodedXLogRecord *record, XLogRecPtr end_lsn,
			  WalFormat format, const char *why)
{
	WalFormat	other = format == WAL_FORMAT_VANILLA ?
		WAL_FORMAT_NEON : WAL_FORMAT_VANILLA;
	RmgrData	rmgr = GetRmgr(record->header.xl_rmid);
	const char *kind = rmgr.rm_identify(record->header.xl_info);

	ereport(ERROR,
			(errcode(ERRCODE_WALREDOD_WAL_FORMAT_MISMATCH),
			 errmsg("walredod: %s %s record at end LSN %X/%X is not in the heap record format of %s (%s); for WAL written by %s, set engine.wal_format = \"%s\"",
					rmgr.rm_name, kind ? kind : "?", LSN_FORMAT_ARGS(end_lsn),
					layouts[format].writer, why,
					layouts[other].writer, layouts[other].setting)));
}

/*
 * Check a tuple header that redo reads: its t_hoff must be the one
 * PostgreSQL gives the tuple, and the bytes after the header must hold at
 * least the null bitmap and padding that t_hoff announces.
 */
static void
check_tuple_header(DecodedXLogRecord *record, XLogRecPtr end_lsn,
				   WalFormat format, const char *header, Size avail,
				   int header_size, int infomask2_offset, int hoff_offset,
				   const char *what)
{
	uint8		hoff;
	int			expected;

	if (avail < header_size)
		refuse_record(record, end_lsn, format,
					  psprintf("%s has %zu bytes, too few for its %d-byte header",
							   what, avail, header_size));
	hoff = (uint8) header[hoff_offset];
	/* t_infomask follows t_infomask2 in both headers of both formats */
	expected = expected_hoff(read_u16(header + infomask2_offset),
							 read_u16(header + infomask2_offset +
									  sizeof(uint16)));
	if (hoff != expected)
		refuse_record(record, end_lsn, format,
					  psprintf("%s header has t_hoff %u, PostgreSQL gives such a tuple %d",
							   what, hoff, expected));
	if (avail - header_size < hoff - SizeofHeapTupleHeader)
		refuse_record(record, end_lsn, format,
					  psprintf("%s is shorter than its t_hoff %u announces",
							   what, hoff));
}

/*
 * Refuse a tuple redo would build longer than a heap tuple can be: heap redo
 * assembles it in a stack buffer of MaxHeapTupleSize bytes that only an
 * Assert guards, and block data may be up to 64 kB.  'body_len' counts what
 * follows the 23-byte tuple header (bitmap, padding, data, and for an update
 * the prefix and suffix taken from the old tuple).
 */
static void
check_tuple_length(DecodedXLogRecord *record, XLogRecPtr end_lsn,
				   Size body_len, const char *what)
{
	RmgrData	rmgr = GetRmgr(record->header.xl_rmid);
	const char *kind = rmgr.rm_identify(record->header.xl_info);

	if (body_len > MaxHeapTupleSize - SizeofHeapTupleHeader)
		ereport(ERROR,
				(errcode(ERRCODE_DATA_CORRUPTED),
				 errmsg("walredod: %s %s record at end LSN %X/%X: %s would be %zu bytes, more than a heap tuple holds (%zu)",
						rmgr.rm_name, kind ? kind : "?", LSN_FORMAT_ARGS(end_lsn),
						what, body_len + SizeofHeapTupleHeader,
						(Size) MaxHeapTupleSize)));
}

/*
 * An old tuple or key logged in main data for logical decoding: redo never
 * reads it, and it is copied as stored, so only a plausible t_hoff is asked
 * of it.
 */
static void
check_old_tuple_header(DecodedXLogRecord *record, XLogRecPtr end_lsn,
					   WalFormat format, Size offset)
{
	const HeapRecordLayout *layout = &layouts[format];
	const char *header = record->main_data + offset;
	Size		avail = record->main_data_len - offset;
	uint8		hoff;

	if (record->main_data_len < offset + layout->header_size)
		refuse_record(record, end_lsn, format,
					  psprintf("main data is %u bytes, too few for the old tuple's header after the %zu-byte struct",
							   record->main_data_len, offset));
	hoff = (uint8) header[layout->header_hoff];
	if (hoff < SizeofHeapTupleHeader || hoff != MAXALIGN(hoff) ||
		avail - layout->header_size < hoff - SizeofHeapTupleHeader)
		refuse_record(record, end_lsn, format,
					  psprintf("old tuple header has t_hoff %u", hoff));
}

/* Check the main data of a record whose old tuple may follow it. */
static void
check_main_data_size(DecodedXLogRecord *record, XLogRecPtr end_lsn,
					 WalFormat format, int size, bool has_old_tuple)
{
	if (record->main_data_len < size ||
		(!has_old_tuple && record->main_data_len != size))
		refuse_record(record, end_lsn, format,
					  psprintf("main data is %u bytes, the struct is %d",
							   record->main_data_len, size));
	if (has_old_tuple)
		check_old_tuple_header(record, end_lsn, format, size);
}

/*
 * Block 0's data as redo reads it, or NULL when redo restores the block
 * from its image instead.  A block redo reads must carry its tuples.
 */
static DecodedBkpBlock *
block_redo_reads(DecodedXLogRecord *record, XLogRecPtr end_lsn,
				 WalFormat format)
{
	DecodedBkpBlock *blk;

	if (record->max_block_id < 0 || !record->blocks[0].in_use)
		refuse_record(record, end_lsn, format, "it has no block 0");
	blk = &record->blocks[0];
	if (blk->apply_image)
		return NULL;
	if (!blk->has_data)
		refuse_record(record, end_lsn, format,
					  "block 0 has neither an image to restore nor tuple data");
	return blk;
}

static void
check_insert(DecodedXLogRecord *record, XLogRecPtr end_lsn, WalFormat format)
{
	const HeapRecordLayout *layout = &layouts[format];
	DecodedBkpBlock *blk;

	if (record->main_data_len < SizeOfHeapInsert)
		refuse_record(record, end_lsn, format,
					  psprintf("main data is %u bytes, the struct is %zu",
							   record->main_data_len,
							   (Size) SizeOfHeapInsert));
	blk = block_redo_reads(record, end_lsn, format);
	if (blk == NULL)
		return;
	check_tuple_header(record, end_lsn, format, blk->data, blk->data_len,
					   layout->header_size,
					   offsetof(xl_heap_header, t_infomask2),
					   layout->header_hoff, "the inserted tuple");
	check_tuple_length(record, end_lsn, blk->data_len - layout->header_size,
					   "the inserted tuple");
}

static void
check_delete_or_lock(DecodedXLogRecord *record, XLogRecPtr end_lsn,
					 WalFormat format, uint8 old_tuple_flags)
{
	const HeapRecordLayout *layout = &layouts[format];
	uint8		flags = 0;

	if (record->main_data_len > layout->delete_flags)
		flags = (uint8) record->main_data[layout->delete_flags];
	check_main_data_size(record, end_lsn, format, layout->delete_size,
						 (flags & old_tuple_flags) != 0);
}

static void
check_update(DecodedXLogRecord *record, XLogRecPtr end_lsn, WalFormat format)
{
	const HeapRecordLayout *layout = &layouts[format];
	DecodedBkpBlock *blk;
	uint8		flags = 0;
	Size		skip = 0;
	Size		from_old = 0;

	if (record->main_data_len > UPDATE_FLAGS)
		flags = (uint8) record->main_data[UPDATE_FLAGS];
	check_main_data_size(record, end_lsn, format, layout->update_size,
						 (flags & XLH_UPDATE_CONTAINS_OLD) != 0);

	blk = block_redo_reads(record, end_lsn, format);
	if (blk == NULL)
		return;
	/* Lengths of a prefix and a suffix taken from the old tuple come first. */
	if (flags & XLH_UPDATE_PREFIX_FROM_OLD)
		skip += sizeof(uint16);
	if (flags & XLH_UPDATE_SUFFIX_FROM_OLD)
		skip += sizeof(uint16);
	if (blk->data_len < skip)
		refuse_record(record, end_lsn, format,
					  "block 0 data is shorter than its prefix and suffix lengths");
	for (Size at = 0; at < skip; at += sizeof(uint16))
		from_old += read_u16(blk->data + at);
	check_tuple_header(record, end_lsn, format, blk->data + skip,
					   blk->data_len - skip, layout->header_size,
					   offsetof(xl_heap_header, t_infomask2),
					   layout->header_hoff, "the new tuple");
	check_tuple_length(record, end_lsn,
					   blk->data_len - skip - layout->header_size + from_old,
					   "the new tuple");
}

/*
 * Walk a multi-insert's tuples as redo does: each header SHORTALIGNed from
 * the start of the block data, its tuple body after it, all of the data
 * used up.
 */
static void
check_multi_insert(DecodedXLogRecord *record, XLogRecPtr end_lsn,
				   WalFormat format)
{
	const HeapRecordLayout *layout = &layouts[format];
	bool		isinit = (record->header.xl_info & XLOG_HEAP_INIT_PAGE) != 0;
	DecodedBkpBlock *blk;
	uint16		ntuples;
	Size		pos = 0;

	if (record->main_data_len < SizeOfHeapMultiInsert)
		refuse_record(record, end_lsn, format,
					  psprintf("main data is %u bytes, the struct is %zu",
							   record->main_data_len,
							   (Size) SizeOfHeapMultiInsert));
	ntuples = read_u16(record->main_data + MULTI_INSERT_NTUPLES);
	if (ntuples > MaxHeapTuplesPerPage)
		refuse_record(record, end_lsn, format,
					  psprintf("it inserts %u tuples, more than a page holds",
							   ntuples));
	if (!isinit &&
		record->main_data_len <
		MULTI_INSERT_OFFSETS + ntuples * sizeof(uint16))
		refuse_record(record, end_lsn, format,
					  psprintf("main data is %u bytes, too few for %u offsets",
							   record->main_data_len, ntuples));

	blk = block_redo_reads(record, end_lsn, format);
	if (blk == NULL)
		return;
	for (int i = 0; i < ntuples; i++)
	{
		const char *header;
		uint16		datalen;

		pos = SHORTALIGN(pos);
		if (pos > blk->data_len)
			refuse_record(record, end_lsn, format,
						  psprintf("tuple %d of %u starts past the block data",
								   i + 1, ntuples));
		header = blk->data + pos;
		check_tuple_header(record, end_lsn, format, header,
						   blk->data_len - pos, layout->multi_size,
						   offsetof(xl_multi_insert_tuple, t_infomask2),
						   layout->multi_hoff, "an inserted tuple");
		datalen = read_u16(header);
		check_tuple_length(record, end_lsn, datalen, "an inserted tuple");
		if (blk->data_len - pos - layout->multi_size < datalen)
			refuse_record(record, end_lsn, format,
						  psprintf("tuple %d of %u is longer than the block data left",
								   i + 1, ntuples));
		pos += layout->multi_size + datalen;
	}
	if (pos != blk->data_len)
		refuse_record(record, end_lsn, format,
					  psprintf("its %u tuples take %zu bytes of the %u in the block data",
							   ntuples, pos, blk->data_len));
}

/*
 * Refuse a heap record whose layout is not 'format', before anything of it
 * is applied.  Records without a format-dependent layout pass.
 */
void
check_heap_record_format(DecodedXLogRecord *record, XLogRecPtr end_lsn,
						 WalFormat format)
{
	uint8		op = record->header.xl_info & XLOG_HEAP_OPMASK;

	if (record->header.xl_rmid == RM_HEAP_ID)
	{
		switch (op)
		{
			case XLOG_HEAP_INSERT:
				check_insert(record, end_lsn, format);
				break;
			case XLOG_HEAP_DELETE:
				check_delete_or_lock(record, end_lsn, format,
									 XLH_DELETE_CONTAINS_OLD);
				break;
			case XLOG_HEAP_UPDATE:
			case XLOG_HEAP_HOT_UPDATE:
				check_update(record, end_lsn, format);
				break;
			case XLOG_HEAP_LOCK:
				check_delete_or_lock(record, end_lsn, format, 0);
				break;
			default:
				break;
		}
	}
	else if (record->header.xl_rmid == RM_HEAP2_ID &&
			 op == XLOG_HEAP2_MULTI_INSERT)
		check_multi_insert(record, end_lsn, format);
}

/* --- Neon's records on stock redo --------------------------------------- */

static void
add_cid_fix(int block_id, OffsetNumber offnum, bool set_cid, CommandId cid,
			bool combo)
{
	CidFix	   *fix;

	Assert(ncid_fixes < MAX_CID_FIXES);
	fix = &cid_fixes[ncid_fixes++];
	fix->block_id = block_id;
	fix->offnum = offnum;
	fix->set_cid = set_cid;
	fix->cid = cid;
	fix->combo = combo;
}

/*
 * Write a vanilla xl_heap_header for a Neon one: the same fields without
 * t_cid.
 */
static void
put_vanilla_header(char *out, const char *neon)
{
	memcpy(out, neon, offsetof(xl_heap_header, t_hoff));
	out[offsetof(xl_heap_header, t_hoff)] =
		neon[layouts[WAL_FORMAT_NEON].header_hoff];
}

/*
 * An insert's or update's new tuple: block 0 data is 'skip' bytes of
 * prefix and suffix lengths, then the tuple header, then the tuple body.
 * Point the block at a vanilla copy in 'context' and note the tuple's fix.
 */
static void
neon_new_tuple_to_vanilla(DecodedBkpBlock *blk, Size skip,
						  OffsetNumber offnum, MemoryContext context)
{
	const HeapRecordLayout *neon = &layouts[WAL_FORMAT_NEON];
	const char *header = blk->data + skip;
	Size		body_len = blk->data_len - skip - neon->header_size;
	char	   *out = MemoryContextAlloc(context,
										 skip + SizeOfHeapHeader + body_len);

	memcpy(out, blk->data, skip);
	put_vanilla_header(out + skip, header);
	memcpy(out + skip + SizeOfHeapHeader, header + neon->header_size,
		   body_len);
	add_cid_fix(0, offnum, true, read_u32(header + NEON_HEADER_CID),
				(read_u16(header + offsetof(xl_heap_header, t_infomask)) &
				 HEAP_COMBOCID) != 0);
	blk->data = out;
	blk->data_len = skip + SizeOfHeapHeader + body_len;
}

static void
neon_insert_to_vanilla(DecodedXLogRecord *record, MemoryContext context)
{
	DecodedBkpBlock *blk = &record->blocks[0];

	if (!blk->apply_image)
		neon_new_tuple_to_vanilla(blk, 0,
								  read_u16(record->main_data +
										   offsetof(xl_heap_insert, offnum)),
								  context);
}

static void
neon_multi_insert_to_vanilla(DecodedXLogRecord *record,
							 MemoryContext context)
{
	const HeapRecordLayout *neon = &layouts[WAL_FORMAT_NEON];
	bool		isinit = (record->header.xl_info & XLOG_HEAP_INIT_PAGE) != 0;
	uint16		ntuples = read_u16(record->main_data + MULTI_INSERT_NTUPLES);
	DecodedBkpBlock *blk = &record->blocks[0];
	char	   *out;
	Size		in_pos = 0;
	Size		out_pos = 0;

	if (blk->apply_image)
		return;

	/*
	 * The check walked these tuples already.  Vanilla headers are shorter,
	 * so the vanilla data is never longer.
	 */
	out = MemoryContextAllocZero(context, blk->data_len);
	for (int i = 0; i < ntuples; i++)
	{
		const char *header = blk->data + SHORTALIGN(in_pos);
		uint16		datalen = read_u16(header);
		uint16		infomask = read_u16(header +
										offsetof(xl_multi_insert_tuple,
												 t_infomask));
		OffsetNumber offnum;

		out_pos = SHORTALIGN(out_pos);
		memcpy(out + out_pos, header, offsetof(xl_multi_insert_tuple, t_hoff));
		out[out_pos + offsetof(xl_multi_insert_tuple, t_hoff)] =
			header[neon->multi_hoff];
		memcpy(out + out_pos + SizeOfMultiInsertTuple,
			   header + neon->multi_size, datalen);
		out_pos += SizeOfMultiInsertTuple + datalen;
		in_pos = SHORTALIGN(in_pos) + neon->multi_size + datalen;

		offnum = isinit ? FirstOffsetNumber + i :
			read_u16(record->main_data + MULTI_INSERT_OFFSETS +
					 i * sizeof(uint16));
		add_cid_fix(0, offnum, true, read_u32(header + NEON_MULTI_CID),
					(infomask & HEAP_COMBOCID) != 0);
	}
	blk->data = out;
	blk->data_len = out_pos;
}

/*
 * Delete and lock: the same struct in both formats but for t_cid, which
 * Neon puts (with padding) before infobits_set and flags.
 */
static void
neon_delete_or_lock_to_vanilla(DecodedXLogRecord *record,
							   MemoryContext context)
{
	const HeapRecordLayout *vanilla = &layouts[WAL_FORMAT_VANILLA];
	const HeapRecordLayout *neon = &layouts[WAL_FORMAT_NEON];
	const char *in = record->main_data;
	char	   *out = MemoryContextAlloc(context, vanilla->delete_size);
	uint8		infobits = (uint8) in[neon->delete_infobits];

	memcpy(out, in, DELETE_OFFNUM + sizeof(OffsetNumber));
	out[vanilla->delete_infobits] = infobits;
	out[vanilla->delete_flags] = in[neon->delete_flags];
	add_cid_fix(0, read_u16(in + DELETE_OFFNUM), true,
				read_u32(in + NEON_DELETE_CID),
				(infobits & NEON_XLHL_COMBOCID) != 0);

	/* An old tuple or key after the struct is for logical decoding only. */
	record->main_data = out;
	record->main_data_len = vanilla->delete_size;
}

static void
neon_update_to_vanilla(DecodedXLogRecord *record, MemoryContext context)
{
	const HeapRecordLayout *vanilla = &layouts[WAL_FORMAT_VANILLA];
	const char *in = record->main_data;
	char	   *out = MemoryContextAlloc(context, vanilla->update_size);
	uint8		flags = (uint8) in[UPDATE_FLAGS];
	bool		other_page = record->max_block_id >= 1 &&
		record->blocks[1].in_use;
	DecodedBkpBlock *blk = &record->blocks[0];
	OffsetNumber new_offnum;
	Size		skip = 0;

	/* old_xmax, old_offnum, old_infobits_set, flags; new_xmax, new_offnum */
	memcpy(out, in, NEON_UPDATE_CID);
	memcpy(out + NEON_UPDATE_CID, in + NEON_UPDATE_NEW_XMAX,
		   vanilla->update_size - NEON_UPDATE_CID);
	new_offnum = read_u16(out + offsetof(xl_heap_update, new_offnum));

	/* The old version: on block 1, or on block 0 beside the new one. */
	add_cid_fix(other_page ? 1 : 0, read_u16(in + UPDATE_OLD_OFFNUM), true,
				read_u32(in + NEON_UPDATE_CID),
				((uint8) in[UPDATE_OLD_INFOBITS] & NEON_XLHL_COMBOCID) != 0);

	if (!blk->apply_image)
	{
		if (flags & XLH_UPDATE_PREFIX_FROM_OLD)
			skip += sizeof(uint16);
		if (flags & XLH_UPDATE_SUFFIX_FROM_OLD)
			skip += sizeof(uint16);
		neon_new_tuple_to_vanilla(blk, skip, new_offnum, context);
	}

	record->main_data = out;
	record->main_data_len = vanilla->update_size;
}

/*
 * Lock of an updated version: same layout in both formats, but Neon's redo
 * sets HEAP_COMBOCID from the infobits (so clears it: its writer never sets
 * the bit here), where stock redo leaves the flag alone.
 */
static void
neon_lock_updated_fix(DecodedXLogRecord *record)
{
	const char *in = record->main_data;

	if (record->main_data_len < SizeOfHeapLockUpdated)
		return;					/* stock redo reads past it: not ours to fix */
	add_cid_fix(0, read_u16(in + LOCK_UPDATED_OFFNUM), false, 0,
				((uint8) in[LOCK_UPDATED_INFOBITS] & NEON_XLHL_COMBOCID) != 0);
}

/*
 * Rewrite a checked Neon-format heap record, in place in the decoded
 * record, into the vanilla layout stock redo reads; copies live in
 * 'context'.  The fixes stock redo's result then needs are kept until
 * neon_apply_cid_fixes.
 */
void
neon_heap_record_to_vanilla(DecodedXLogRecord *record, MemoryContext context)
{
	uint8		op = record->header.xl_info & XLOG_HEAP_OPMASK;

	ncid_fixes = 0;
	if (record->header.xl_rmid == RM_HEAP_ID)
	{
		switch (op)
		{
			case XLOG_HEAP_INSERT:
				neon_insert_to_vanilla(record, context);
				break;
			case XLOG_HEAP_DELETE:
			case XLOG_HEAP_LOCK:
				neon_delete_or_lock_to_vanilla(record, context);
				break;
			case XLOG_HEAP_UPDATE:
			case XLOG_HEAP_HOT_UPDATE:
				neon_update_to_vanilla(record, context);
				break;
			default:
				break;
		}
	}
	else if (record->header.xl_rmid == RM_HEAP2_ID)
	{
		if (op == XLOG_HEAP2_MULTI_INSERT)
			neon_multi_insert_to_vanilla(record, context);
		else if (op == XLOG_HEAP2_LOCK_UPDATED)
			neon_lock_updated_fix(record);
	}
}

bool
neon_cid_fixes_pending(void)
{
	return ncid_fixes > 0;
}

/*
 * Set t_cid and HEAP_COMBOCID as Neon's redo does on the tuples stock redo
 * just wrote to 'page', the page of every block id in 'redone_blocks' (a
 * bit per block id).
 */
void
neon_apply_cid_fixes(Page page, uint64 redone_blocks)
{
	for (int i = 0; i < ncid_fixes; i++)
	{
		CidFix	   *fix = &cid_fixes[i];
		ItemId		lp;
		HeapTupleHeader htup;

		if ((redone_blocks & (UINT64CONST(1) << fix->block_id)) == 0)
			continue;
		if (fix->offnum < FirstOffsetNumber ||
			fix->offnum > PageGetMaxOffsetNumber(page))
			ereport(ERROR,
					(errcode(ERRCODE_INTERNAL_ERROR),
					 errmsg("walredod: redo left no tuple at offset %u of block reference %u",
							fix->offnum, fix->block_id)));
		lp = PageGetItemId(page, fix->offnum);
		if (!ItemIdIsNormal(lp))
			ereport(ERROR,
					(errcode(ERRCODE_INTERNAL_ERROR),
					 errmsg("walredod: redo left no tuple at offset %u of block reference %u",
							fix->offnum, fix->block_id)));
		htup = (HeapTupleHeader) PageGetItem(page, lp);
		if (fix->set_cid)
			htup->t_choice.t_heap.t_field3.t_cid = fix->cid;
		if (fix->combo)
			htup->t_infomask |= HEAP_COMBOCID;
		else
			htup->t_infomask &= ~HEAP_COMBOCID;
	}
	ncid_fixes = 0;
}
