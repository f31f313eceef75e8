/*-------------------------------------------------------------------------
 *
 * wal_format.h
 *		Which PostgreSQL 15 wrote the heap records: vanilla, or Neon's
 *		compute, whose heap records carry the command id (t_cid).
 *
 * Copyright (c) 2026, the walredod developers.
 *-------------------------------------------------------------------------
 */
#ifndef WALREDOD_WAL_FORMAT_H
#define WALREDOD_WAL_FORMAT_H

#include "access/xlogreader.h"
#include "storage/bufpage.h"
#include "utils/guc.h"

/* Values of the setting walredod.wal_format. */
typedef enum WalFormat
{
	WAL_FORMAT_VANILLA,
	WAL_FORMAT_NEON
} WalFormat;

/* A record is not in the WAL format the engine serves: a bad request. */
#define ERRCODE_WALREDOD_WAL_FORMAT_MISMATCH \
	MAKE_SQLSTATE('W','R','0','0','1')

extern const struct config_enum_entry wal_format_options[];

extern void check_heap_record_format(DecodedXLogRecord *record,
									 XLogRecPtr end_lsn, WalFormat format);
extern void neon_heap_record_to_vanilla(DecodedXLogRecord *record,
										MemoryContext context);
extern bool neon_cid_fixes_pending(void);
extern void neon_apply_cid_fixes(Page page, uint64 redone_blocks);

#endif							/* WALREDOD_WAL_FORMAT_H */
