/*-------------------------------------------------------------------------
 *
 * walredod_redo.h
 *		What the parts of walredod's redo child share: a whole redo request,
 *		checked before redo touches anything and then run, and the entry
 *		points of the local data path (local_server.c).
 *
 * Copyright (c) 2026, the walredod developers.
 *-------------------------------------------------------------------------
 */
#ifndef WALREDOD_REDO_H
#define WALREDOD_REDO_H

#include <poll.h>

#include "access/xlogdefs.h"
#include "common/relpath.h"
#include "storage/block.h"
#include "storage/relfilenode.h"

/* One record of a request, in place in the buffer the request arrived in. */
typedef struct RedoRequestRecord
{
	XLogRecPtr	end_lsn;		/* the position just past the record */
	const char *data;			/* the whole raw XLogRecord, maybe unaligned */
	uint32		len;
} RedoRequestRecord;

/* A whole redo request: the page 'rnode/fork/blkno' as of 'lsn'. */
typedef struct RedoRequest
{
	RelFileNode rnode;
	ForkNumber	fork;
	BlockNumber blkno;
	XLogRecPtr	lsn;
	const char *image;			/* BLCKSZ bytes; NULL: the page starts new */
	int			nrecords;
	const RedoRequestRecord *records;
} RedoRequest;

/* Big-endian integers of both protocols (the pipe's and the local path's). */
static inline uint32
get_u32(const char *p)
{
	const unsigned char *u = (const unsigned char *) p;

	return ((uint32) u[0] << 24) | ((uint32) u[1] << 16) |
		((uint32) u[2] << 8) | (uint32) u[3];
}

static inline uint64
get_u64(const char *p)
{
	return ((uint64) get_u32(p) << 32) | get_u32(p + 4);
}

/* walredod_redo.c */
extern int	poll_spinning(struct pollfd *fds, nfds_t nfds, int timeout);
extern bool is_invalid_request_sqlstate(int sqlerrcode);
extern void check_redo_request(const RedoRequest *req);
extern ErrorData *refusal_of_request(RedoRequest *req,
									  void (*prepare) (RedoRequest *req, int arg),
									  int arg);
extern int	run_redo_request(const RedoRequest *req, char *page);

/* local_server.c */
extern void local_server_define_gucs(void);
extern void local_server_start(void);
extern int	local_server_listen_fd(void);
extern void local_server_serve_until_stdin(void);

#endif							/* WALREDOD_REDO_H */
