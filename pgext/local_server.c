/*-------------------------------------------------------------------------
 *
 * local_server.c
 *		The local data path of walredod's redo child: clients on the same
 *		machine send redo requests straight to the child over a Unix-domain
 *		stream socket, with no process in between (docs/local-data-path.md).
 *
 * The worker that manages the child creates, binds and listens on the socket
 * and hands it over as an inherited descriptor (walredod.local_listen_fd);
 * the warm spare inherits the same one, so whichever child lives accepts the
 * next connection.  Between requests on stdin (the pipe protocol, unchanged)
 * the child poll()s stdin, the listening socket and its connections, and
 * serves each connection's requests in order, replies in the same order.
 *
 * A request is checked whole before redo touches anything: framing, lengths,
 * tag, every record's CRC, resource manager and block references, the order
 * of LSNs.  A refusal is an error reply on the same connection; the child
 * stays.  Only a failure inside redo itself ends the child, as on stdin.
 *
 * The child publishes what its manager needs on a small shared "board" it is
 * given (walredod.local_board_fd): the deadline of the request in progress,
 * so the worker kills a child that overruns it, and counters and a latency
 * histogram for the metrics.  Serving needs only poll, accept4, read, write
 * and close on descriptors the child was given, plus the vDSO clock.
 *
 * Copyright (c) 2026, the walredod developers.
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "utils/elog.h"
#include "utils/guc.h"
#include "utils/memutils.h"

#include "walredod_redo.h"

/* The local wire format; docs/local-data-path.md is its contract. */
#define LOCAL_MAGIC_0			'W'
#define LOCAL_MAGIC_1			'L'
#define LOCAL_VERSION			1
#define REQUEST_HEADER_LEN		24
#define REPLY_HEADER_LEN		16
#define KIND_REDO				1
#define KIND_PING				2
#define REDO_FIXED_LEN			30	/* tag 17, LSN 8, flags 1, records 4 */
#define RECORD_PREFIX_LEN		12	/* end LSN u64, length u32 */
#define FLAG_BASE_IMAGE			0x01
#define MAX_RECORDS				100000

/* Reply statuses: the client protocol's (docs/client-protocol.md). */
#define REPLY_OK				0
#define REPLY_INVALID_REQUEST	1
#define REPLY_INTERNAL			6
#define REPLY_UNSUPPORTED_VERSION 7

#define MAX_CONNECTIONS			1024
#define ACCEPT_BURST			16
/* Requests of one connection served before the next connection's turn. */
#define REQUESTS_PER_TURN		16
#define INITIAL_BUFFER			65536
/* Buffers grown past this for a large request are given back afterwards. */
#define KEEP_BUFFER				(1024 * 1024)
/* How much an input buffer may grow ahead of the bytes that arrived. */
#define READ_GROWTH				(1024 * 1024)
/* A connection whose unread replies reach this is not read from. */
#define OUTPUT_HIGH_WATER		(4 * 1024 * 1024)

/*
 * The board: 64-bit words in the child's native byte order, written only by
 * the child, read by its worker at any time.
 */
#define BOARD_SIZE				4096
#define BOARD_MAGIC				UINT64CONST(0x57524c4200000001)	/* "WRLB" v1 */
#define NUM_LATENCY_BUCKETS		16	/* 15 upper bounds, then +Inf */
enum
{
	B_MAGIC,
	B_BUSY_DEADLINE_NS,			/* CLOCK_MONOTONIC ns; 0 when not in redo */
	B_REQUESTS_OK,
	B_REQUESTS_REFUSED,			/* invalid_request, unsupported_version */
	B_REQUESTS_INTERNAL,		/* refused for a reason of ours */
	B_CONNECTIONS_DROPPED,		/* closed because their framing was lost */
	B_RECORDS,
	B_CONNECTIONS_ACCEPTED,
	B_CONNECTIONS_OPEN,
	B_LATENCY_SUM_NS,
	B_LATENCY_BUCKETS			/* NUM_LATENCY_BUCKETS words follow */
};

/* Upper bounds of the latency buckets, as the daemon's metrics use them. */
static const uint64 latency_bounds_ns[NUM_LATENCY_BUCKETS - 1] = {
	5000, 10000, 25000, 50000, 100000, 250000, 500000, 1000000, 2500000,
	5000000, 10000000, 25000000, 100000000, 250000000, 1000000000
};

typedef struct LocalConnection
{
	int			fd;
	char	   *in;				/* requests as read */
	size_t		in_size;
	size_t		in_start;		/* first byte of the next request */
	size_t		in_end;
	char	   *out;			/* replies not yet written */
	size_t		out_size;
	size_t		out_start;
	size_t		out_end;
	bool		eof;			/* the client will send nothing more */
	bool		closing;		/* framing lost: send what is queued, close */
	bool		broken;			/* a read or write failed: close now */
} LocalConnection;

/* GUCs, set by the worker on the child's command line. */
static int	local_listen_fd = -1;
static int	local_board_fd = -1;
static int	local_default_timeout_ms = 60000;
static int	local_max_request_bytes = 64 * 1024 * 1024;

static volatile uint64 *board;
static uint64 private_board[BOARD_SIZE / sizeof(uint64)];

static MemoryContext local_context;
static LocalConnection *connections;
static int	nconnections;
/* Connections open when accept4 last ran out of descriptors (else INT_MAX). */
static int	accept_paused_at = INT_MAX;
static struct pollfd *pollfds;
static RedoRequestRecord *records;
static int	records_size;

static inline void
put_u32(char *p, uint32 v)
{
	p[0] = (char) (v >> 24);
	p[1] = (char) (v >> 16);
	p[2] = (char) (v >> 8);
	p[3] = (char) v;
}

static inline void
put_u64(char *p, uint64 v)
{
	put_u32(p, (uint32) (v >> 32));
	put_u32(p + 4, (uint32) v);
}

/* CLOCK_MONOTONIC (the vDSO: no system call), the worker's clock too. */
static uint64
monotonic_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64) ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* The inherited listening socket (-1: none), for the sandbox's rules. */
int
local_server_listen_fd(void)
{
	return local_listen_fd;
}

void
local_server_define_gucs(void)
{
	DefineCustomIntVariable("walredod.local_listen_fd",
							"Inherited listening Unix socket of the local data path (-1: none).",
							NULL, &local_listen_fd, -1, -1, INT_MAX,
							PGC_SU_BACKEND, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("walredod.local_board_fd",
							"Inherited shared memory where the child publishes its state and counters (-1: none).",
							NULL, &local_board_fd, -1, -1, INT_MAX,
							PGC_SU_BACKEND, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("walredod.local_default_timeout_ms",
							"Deadline of a local request that names none.",
							NULL, &local_default_timeout_ms, 60000, 1, INT_MAX,
							PGC_SU_BACKEND, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("walredod.local_max_request_bytes",
							"Largest local request accepted, header included.",
							NULL, &local_max_request_bytes, 64 * 1024 * 1024,
							1024, INT_MAX,
							PGC_SU_BACKEND, 0, NULL, NULL, NULL);
}

/*
 * Set up the local data path, before any sandbox closes the door on mmap and
 * fcntl.  Without a listening descriptor the child serves stdin alone.
 */
void
local_server_start(void)
{
	board = private_board;
	if (local_listen_fd < 0)
		return;

	if (local_board_fd >= 0)
	{
		void	   *shared = mmap(NULL, BOARD_SIZE, PROT_READ | PROT_WRITE,
								  MAP_SHARED, local_board_fd, 0);

		if (shared == MAP_FAILED)
			ereport(FATAL,
					(errcode_for_file_access(),
					 errmsg("walredod: could not map the board (descriptor %d): %m",
							local_board_fd)));
		close(local_board_fd);
		board = (volatile uint64 *) shared;
	}
	board[B_BUSY_DEADLINE_NS] = 0;
	board[B_MAGIC] = BOARD_MAGIC;

	/*
	 * The spare shares the listening socket's file description: whichever
	 * child is woken first takes a connection, the other gets EAGAIN.
	 */
	if (fcntl(local_listen_fd, F_SETFL, O_NONBLOCK) < 0)
		ereport(FATAL,
				(errcode_for_file_access(),
				 errmsg("walredod: descriptor %d of walredod.local_listen_fd is unusable: %m",
						local_listen_fd)));
	/* A client that hangs up makes write() fail with EPIPE, not kill us. */
	pqsignal(SIGPIPE, SIG_IGN);

	local_context = AllocSetContextCreate(TopMemoryContext,
										  "walredod local connections",
										  ALLOCSET_DEFAULT_SIZES);
	connections = MemoryContextAllocZero(local_context,
										 MAX_CONNECTIONS * sizeof(LocalConnection));
	pollfds = MemoryContextAlloc(local_context,
								 (MAX_CONNECTIONS + 2) * sizeof(struct pollfd));
	records_size = 64;
	records = MemoryContextAlloc(local_context,
								 records_size * sizeof(RedoRequestRecord));
}

/* --- buffers ------------------------------------------------------------ */

/*
 * Make room for 'want' bytes from 'start' on; data moves to offset 0.  With
 * 'may_fail', running out of memory returns NULL and leaves the buffer as it
 * was (input: the connection is dropped, the child serves on); otherwise it
 * is an ERROR.
 */
static char *
make_room(char *buf, size_t *size, size_t *start, size_t *end, size_t want,
		  bool may_fail)
{
	size_t		have = *end - *start;

	if (*size - *start >= want)
		return buf;
	if (*size >= want)
		memmove(buf, buf + *start, have);
	else
	{
		size_t		newsize = Max(want, *size * 2);
		char	   *newbuf;

		newbuf = MemoryContextAllocExtended(local_context, newsize,
											MCXT_ALLOC_HUGE |
											(may_fail ? MCXT_ALLOC_NO_OOM : 0));
		if (newbuf == NULL)
			return NULL;
		if (have > 0)
			memcpy(newbuf, buf + *start, have);
		if (buf)
			pfree(buf);
		buf = newbuf;
		*size = newsize;
	}
	*start = 0;
	*end = have;
	return buf;
}

/* Give back a buffer a large request grew, once it is empty. */
static char *
shrink_if_idle(char *buf, size_t *size, size_t start, size_t end)
{
	char	   *small;

	if (*size <= KEEP_BUFFER || start != end)
		return buf;
	small = MemoryContextAllocExtended(local_context, INITIAL_BUFFER,
									   MCXT_ALLOC_NO_OOM);
	if (small == NULL)
		return buf;				/* keep the large one for now */
	pfree(buf);
	*size = INITIAL_BUFFER;
	return small;
}

static inline size_t
pending_output(const LocalConnection *c)
{
	return c->out_end - c->out_start;
}

/*
 * Queue a reply header and reserve 'body_len' bytes after it; returns them.
 * NULL when there is no memory for it: the connection is then dropped (its
 * client re-sends what it had in flight), the child and the others serve on.
 */
static char *
queue_reply(LocalConnection *c, uint64 request_id, int status, uint32 body_len)
{
	char	   *out;
	char	   *h;

	if (c->out_start == c->out_end)
		c->out_start = c->out_end = 0;
	out = make_room(c->out, &c->out_size, &c->out_start, &c->out_end,
					c->out_end - c->out_start + REPLY_HEADER_LEN + body_len,
					true);
	if (out == NULL)
	{
		c->broken = true;
		board[B_CONNECTIONS_DROPPED]++;
		return NULL;
	}
	c->out = out;
	h = c->out + c->out_end;
	h[0] = LOCAL_MAGIC_0;
	h[1] = LOCAL_MAGIC_1;
	h[2] = LOCAL_VERSION;
	h[3] = (char) status;
	put_u32(h + 4, body_len);
	put_u64(h + 8, request_id);
	c->out_end += REPLY_HEADER_LEN + body_len;
	return h + REPLY_HEADER_LEN;
}

/* An error reply naming what was wrong. */
static void
refuse(LocalConnection *c, uint64 request_id, int status, const char *fmt,...)
{
	char		message[1024];
	va_list		args;
	int			len;
	char	   *body;

	va_start(args, fmt);
	len = vsnprintf(message, sizeof(message), fmt, args);
	va_end(args);
	len = Min(Max(len, 0), (int) sizeof(message) - 1);
	body = queue_reply(c, request_id, status, len);
	if (body == NULL)
		return;
	memcpy(body, message, len);
	board[status == REPLY_INTERNAL ? B_REQUESTS_INTERNAL : B_REQUESTS_REFUSED]++;
}

/* --- I/O ---------------------------------------------------------------- */

static void
flush_output(LocalConnection *c)
{
	while (c->out_start < c->out_end && !c->broken)
	{
		ssize_t		n = write(c->fd, c->out + c->out_start,
							  c->out_end - c->out_start);

		if (n > 0)
			c->out_start += n;
		else if (n < 0 && errno == EINTR)
			continue;
		else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
			return;
		else
			c->broken = true;	/* EPIPE, ECONNRESET: the client left */
	}
	if (c->out_start == c->out_end)
	{
		c->out_start = c->out_end = 0;
		c->out = shrink_if_idle(c->out, &c->out_size, 0, 0);
	}
}

/* The limit counts the whole request, header included (local-data-path.md). */
static inline bool
request_size_allowed(uint32 body_len)
{
	return REQUEST_HEADER_LEN + (size_t) body_len <= (size_t) local_max_request_bytes;
}

/* Bytes the next request needs in the buffer, as far as its header tells. */
static size_t
next_request_size(const LocalConnection *c)
{
	size_t		have = c->in_end - c->in_start;
	const char *h = c->in + c->in_start;
	uint32		body_len;

	if (have < REQUEST_HEADER_LEN)
		return REQUEST_HEADER_LEN;
	body_len = get_u32(h + 4);
	if (h[0] != LOCAL_MAGIC_0 || h[1] != LOCAL_MAGIC_1 ||
		h[2] != LOCAL_VERSION || !request_size_allowed(body_len))
		return REQUEST_HEADER_LEN;	/* refused on its header alone */
	return REQUEST_HEADER_LEN + (size_t) body_len;
}

static inline bool
has_request(const LocalConnection *c)
{
	return c->in_end - c->in_start >= next_request_size(c);
}

static void
read_input(LocalConnection *c)
{
	ssize_t		n;
	size_t		have;
	char	   *in;

	if (c->in_start == c->in_end)
	{
		c->in_start = c->in_end = 0;
		c->in = shrink_if_idle(c->in, &c->in_size, 0, 0);
	}
	/*
	 * Room for some more bytes: a buffer grows with what has arrived, never
	 * to the size a header merely announces, so headers alone cannot make
	 * the child allocate.
	 */
	have = c->in_end - c->in_start;
	in = make_room(c->in, &c->in_size, &c->in_start, &c->in_end,
				   Max(have + 4096, Min(next_request_size(c), have + READ_GROWTH)),
				   true);
	if (in == NULL)
	{
		c->broken = true;		/* out of memory: drop this connection only */
		board[B_CONNECTIONS_DROPPED]++;
		return;
	}
	c->in = in;
	n = read(c->fd, c->in + c->in_end, c->in_size - c->in_end);
	if (n > 0)
		c->in_end += n;
	else if (n == 0)
		c->eof = true;
	else if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)
		c->broken = true;
}

static void
accept_connections(void)
{
	for (int i = 0; i < ACCEPT_BURST && nconnections < MAX_CONNECTIONS; i++)
	{
		int			fd = accept4(local_listen_fd, NULL, NULL,
								 SOCK_NONBLOCK | SOCK_CLOEXEC);
		LocalConnection *c;

		if (fd < 0)
		{
			if (errno == EINTR || errno == ECONNABORTED)
				continue;

			/*
			 * Out of descriptors (the sandbox caps them): the connection
			 * waits in the backlog, or for the other child, until one of
			 * ours closes; polling the listener meanwhile would spin.
			 */
			if ((errno == EMFILE || errno == ENFILE || errno == ENOBUFS ||
				 errno == ENOMEM) && nconnections > 0)
				accept_paused_at = nconnections;
			/* EAGAIN: the other child took it */
			return;
		}
		c = &connections[nconnections];
		memset(c, 0, sizeof(*c));
		c->in = MemoryContextAllocExtended(local_context, INITIAL_BUFFER,
										   MCXT_ALLOC_NO_OOM);
		c->out = MemoryContextAllocExtended(local_context, INITIAL_BUFFER,
											MCXT_ALLOC_NO_OOM);
		if (c->in == NULL || c->out == NULL)
		{
			/* No memory for another connection: its client tries again. */
			if (c->in)
				pfree(c->in);
			if (c->out)
				pfree(c->out);
			close(fd);
			board[B_CONNECTIONS_DROPPED]++;
			return;
		}
		nconnections++;
		c->fd = fd;
		c->in_size = c->out_size = INITIAL_BUFFER;
		board[B_CONNECTIONS_ACCEPTED]++;
		board[B_CONNECTIONS_OPEN]++;
	}
}

/* Close what is finished, keeping the array dense. */
static void
close_finished(void)
{
	int			kept = 0;

	for (int i = 0; i < nconnections; i++)
	{
		LocalConnection *c = &connections[i];
		bool		done = c->broken ||
			((c->eof || c->closing) && pending_output(c) == 0 &&
			 (c->closing || !has_request(c)));

		if (!done)
		{
			if (kept != i)
				connections[kept] = *c;
			kept++;
			continue;
		}
		close(c->fd);
		pfree(c->in);
		pfree(c->out);
		board[B_CONNECTIONS_OPEN]--;
	}
	if (kept < nconnections)
		accept_paused_at = INT_MAX;
	nconnections = kept;
}

/* --- requests ----------------------------------------------------------- */

/*
 * Parse a redo request's body into 'req' (its records in place).  Returns
 * NULL, or what is wrong with it; *ours is set when that is our own lack of
 * memory, not the request.
 */
static const char *
parse_redo(const char *body, uint32 len, RedoRequest *req, char *why, size_t whylen,
		   bool *ours)
{
	uint32		nrecords;
	uint8		flags;
	size_t		pos = REDO_FIXED_LEN;

	if (len < REDO_FIXED_LEN)
	{
		snprintf(why, whylen, "redo request body is %u bytes, shorter than its fixed part (%d)",
				 len, REDO_FIXED_LEN);
		return why;
	}
	req->fork = (ForkNumber) (uint8) body[0];
	req->rnode.spcNode = get_u32(body + 1);
	req->rnode.dbNode = get_u32(body + 5);
	req->rnode.relNode = get_u32(body + 9);
	req->blkno = get_u32(body + 13);
	req->lsn = get_u64(body + 17);
	flags = (uint8) body[25];
	nrecords = get_u32(body + 26);
	if (flags & ~FLAG_BASE_IMAGE)
	{
		snprintf(why, whylen, "unknown flags 0x%02X in redo request", flags);
		return why;
	}
	if (nrecords > MAX_RECORDS)
	{
		snprintf(why, whylen, "%u records in one request; at most %d", nrecords, MAX_RECORDS);
		return why;
	}
	req->image = NULL;
	if (flags & FLAG_BASE_IMAGE)
	{
		if (len - pos < BLCKSZ)
		{
			snprintf(why, whylen, "redo request ends inside its base image");
			return why;
		}
		req->image = body + pos;
		pos += BLCKSZ;
	}
	if ((int) nrecords > records_size)
	{
		int			size = Max((int) nrecords, 2 * records_size);
		RedoRequestRecord *grown;

		grown = MemoryContextAllocExtended(local_context, size * sizeof(RedoRequestRecord),
										   MCXT_ALLOC_HUGE | MCXT_ALLOC_NO_OOM);
		if (grown == NULL)
		{
			*ours = true;
			snprintf(why, whylen, "no memory for %u records", nrecords);
			return why;
		}
		pfree(records);
		records = grown;
		records_size = size;
	}
	for (uint32 i = 0; i < nrecords; i++)
	{
		RedoRequestRecord *r = &records[i];

		if (len - pos < RECORD_PREFIX_LEN)
		{
			snprintf(why, whylen, "redo request ends before record %u of %u", i, nrecords);
			return why;
		}
		r->end_lsn = get_u64(body + pos);
		r->len = get_u32(body + pos + 8);
		pos += RECORD_PREFIX_LEN;
		if (len - pos < r->len)
		{
			snprintf(why, whylen, "record %u of %u claims %u bytes, the request holds %zu more",
					 i, nrecords, r->len, len - pos);
			return why;
		}
		r->data = body + pos;
		pos += r->len;
	}
	if (pos != len)
	{
		snprintf(why, whylen, "%zu bytes left over after the last record", len - pos);
		return why;
	}
	req->nrecords = (int) nrecords;
	req->records = records;
	return NULL;
}

static void
record_latency(uint64 ns)
{
	int			bucket = 0;

	while (bucket < NUM_LATENCY_BUCKETS - 1 && ns > latency_bounds_ns[bucket])
		bucket++;
	board[B_LATENCY_BUCKETS + bucket]++;
	board[B_LATENCY_SUM_NS] += ns;
}

static void
serve_redo(LocalConnection *c, uint64 request_id, uint32 timeout_ms,
		   const char *body, uint32 len)
{
	RedoRequest req;
	char		why[256];
	ErrorData  *refusal;
	uint64		started;
	char	   *page;
	int			replayed;
	bool		ours = false;

	if (parse_redo(body, len, &req, why, sizeof(why), &ours) != NULL)
	{
		refuse(c, request_id, ours ? REPLY_INTERNAL : REPLY_INVALID_REQUEST,
			   "walredod: %s", why);
		return;
	}

	/* Refused here, nothing was touched: answer and carry on. */
	refusal = refusal_of_request(&req, NULL, 0);
	if (refusal != NULL)
	{
		refuse(c, request_id,
			   is_invalid_request_sqlstate(refusal->sqlerrcode) ?
			   REPLY_INVALID_REQUEST : REPLY_INTERNAL,
			   "%s (ERROR %s)", refusal->message,
			   unpack_sql_state(refusal->sqlerrcode));
		FreeErrorData(refusal);
		return;
	}

	/* From here on an error is a redo failure, and ends the process. */
	started = monotonic_ns();
	board[B_BUSY_DEADLINE_NS] = started +
		(uint64) (timeout_ms ? timeout_ms : local_default_timeout_ms) * 1000000;
	page = queue_reply(c, request_id, REPLY_OK, BLCKSZ);
	if (page == NULL)
	{
		board[B_BUSY_DEADLINE_NS] = 0;
		return;
	}
	replayed = run_redo_request(&req, page);
	board[B_BUSY_DEADLINE_NS] = 0;
	record_latency(monotonic_ns() - started);
	board[B_RECORDS] += replayed;
	board[B_REQUESTS_OK]++;
}

/* Serve the request at the head of the connection's input (has_request). */
static void
serve_request(LocalConnection *c)
{
	const char *h = c->in + c->in_start;
	uint64		request_id;
	uint32		body_len;
	uint8		kind;

	if (h[0] != LOCAL_MAGIC_0 || h[1] != LOCAL_MAGIC_1)
	{
		refuse(c, 0, REPLY_INVALID_REQUEST,
			   "walredod: not a local-path request (it does not start with \"WL\"); closing the connection");
		c->closing = true;
		board[B_CONNECTIONS_DROPPED]++;
		return;
	}
	request_id = get_u64(h + 8);
	body_len = get_u32(h + 4);
	if (h[2] != LOCAL_VERSION)
	{
		refuse(c, request_id, REPLY_UNSUPPORTED_VERSION,
			   "walredod: local protocol version %u is not supported; this redo child speaks %d",
			   (uint8) h[2], LOCAL_VERSION);
		c->closing = true;
		board[B_CONNECTIONS_DROPPED]++;
		return;
	}
	if (!request_size_allowed(body_len))
	{
		refuse(c, request_id, REPLY_INVALID_REQUEST,
			   "walredod: request of %zu bytes (header included) is over the limit of %d; closing the connection",
			   REQUEST_HEADER_LEN + (size_t) body_len, local_max_request_bytes);
		c->closing = true;
		board[B_CONNECTIONS_DROPPED]++;
		return;
	}

	/* The request's bytes stay where they are until the next read. */
	kind = (uint8) h[3];
	c->in_start += REQUEST_HEADER_LEN + (size_t) body_len;
	switch (kind)
	{
		case KIND_REDO:
			serve_redo(c, request_id, get_u32(h + 16), h + REQUEST_HEADER_LEN,
					   body_len);
			break;
		case KIND_PING:
			if (body_len != 0)
				refuse(c, request_id, REPLY_INVALID_REQUEST,
					   "walredod: a ping has no body, this one has %u bytes", body_len);
			else
				queue_reply(c, request_id, REPLY_OK, 0);
			break;
		default:
			refuse(c, request_id, REPLY_INVALID_REQUEST,
				   "walredod: unknown request kind %u", kind);
	}
}

static inline bool
may_serve(const LocalConnection *c)
{
	return !c->broken && !c->closing &&
		pending_output(c) < OUTPUT_HIGH_WATER && has_request(c);
}

/*
 * Serve local clients until stdin has something for us (or ends): stdin is
 * looked at after each round over the connections, so a request from the
 * worker waits for at most one round of local requests.
 */
void
local_server_serve_until_stdin(void)
{
	if (local_listen_fd < 0)
		return;

	for (;;)
	{
		int			timeout = -1;
		int			n;
		bool		stdin_ready;
		bool		listener_ready;

		pollfds[0].fd = STDIN_FILENO;
		pollfds[0].events = POLLIN;
		pollfds[1].fd = local_listen_fd;
		pollfds[1].events =
			nconnections < MAX_CONNECTIONS && nconnections < accept_paused_at ? POLLIN : 0;
		for (int i = 0; i < nconnections; i++)
		{
			LocalConnection *c = &connections[i];
			short		events = 0;

			if (!c->eof && !c->closing && pending_output(c) < OUTPUT_HIGH_WATER &&
				!(has_request(c) && c->in_end - c->in_start >= INITIAL_BUFFER))
				events |= POLLIN;
			if (pending_output(c) > 0)
				events |= POLLOUT;
			pollfds[i + 2].fd = c->fd;
			pollfds[i + 2].events = events;
			pollfds[i + 2].revents = 0;
			if (may_serve(c))
				timeout = 0;
		}

		n = poll_spinning(pollfds, nconnections + 2, timeout);
		if (n < 0)
		{
			if (errno == EINTR)
				continue;
			ereport(ERROR,
					(errcode_for_socket_access(),
					 errmsg("walredod: poll failed: %m")));
		}
		stdin_ready = n > 0 && pollfds[0].revents != 0;
		listener_ready = n > 0 && pollfds[1].revents != 0;

		for (int i = 0; n > 0 && i < nconnections; i++)
		{
			LocalConnection *c = &connections[i];
			short		revents = pollfds[i + 2].revents;

			if (revents & POLLOUT)
				flush_output(c);
			if (revents & (POLLIN | POLLHUP | POLLERR))
				read_input(c);
			if (revents & POLLNVAL)
				c->broken = true;
		}

		for (int i = 0; i < nconnections; i++)
		{
			LocalConnection *c = &connections[i];

			for (int turn = 0; turn < REQUESTS_PER_TURN && may_serve(c); turn++)
				serve_request(c);
			if (pending_output(c) > 0)
				flush_output(c);
		}

		if (listener_ready)
		{
			if (pollfds[1].revents & POLLNVAL)
				ereport(ERROR,
						(errcode(ERRCODE_CONFIG_FILE_ERROR),
						 errmsg("walredod: descriptor %d of walredod.local_listen_fd is not open",
								local_listen_fd)));
			accept_connections();
		}
		close_finished();
		if (stdin_ready)
			return;
	}
}
