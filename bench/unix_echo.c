/*
 * unix_echo.c
 *		The floor of the local data path: a C server that speaks its framing
 *		(docs/local-data-path.md) and answers every request with an 8192-byte
 *		page at once, with the redo child's own system calls (poll, accept4,
 *		read, write).  Built by bench/unix_floor.py at bench time.
 *
 *		unix_echo <socket path>
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#define MAX_CONNECTIONS 256
#define REQUEST_HEADER_LEN 24
#define REPLY_LEN (16 + 8192)

typedef struct
{
	int			fd;
	char	   *in;
	size_t		in_size;
	size_t		in_end;
	char	   *out;
	size_t		out_size;
	size_t		out_start;
	size_t		out_end;
} Connection;

static uint32_t
get_u32(const unsigned char *p)
{
	return ((uint32_t) p[0] << 24) | ((uint32_t) p[1] << 16) | ((uint32_t) p[2] << 8) | p[3];
}

static void
grow(char **buf, size_t *size, size_t want)
{
	if (*size >= want)
		return;
	while (*size < want)
		*size *= 2;
	*buf = realloc(*buf, *size);
	if (*buf == NULL)
		abort();
}

/* Answer every whole request in the input; keep the rest. */
static void
answer(Connection *c)
{
	size_t		pos = 0;

	while (c->in_end - pos >= REQUEST_HEADER_LEN)
	{
		const unsigned char *h = (const unsigned char *) c->in + pos;
		size_t		total = REQUEST_HEADER_LEN + get_u32(h + 4);
		char	   *r;

		if (c->in_end - pos < total)
			break;
		grow(&c->out, &c->out_size, c->out_end + REPLY_LEN);
		r = c->out + c->out_end;
		memset(r, 0, REPLY_LEN);
		r[0] = 'W';
		r[1] = 'L';
		r[2] = 1;
		r[4] = 0;
		r[5] = 0;
		r[6] = 0x20;			/* 8192 */
		r[7] = 0;
		memcpy(r + 8, h + 8, 8);	/* request id */
		c->out_end += REPLY_LEN;
		pos += total;
	}
	memmove(c->in, c->in + pos, c->in_end - pos);
	c->in_end -= pos;
}

int
main(int argc, char **argv)
{
	struct sockaddr_un addr = {.sun_family = AF_UNIX};
	struct pollfd fds[MAX_CONNECTIONS + 1];
	Connection conns[MAX_CONNECTIONS];
	int			nconns = 0;
	int			listener;

	if (argc != 2 || strlen(argv[1]) >= sizeof(addr.sun_path))
	{
		fprintf(stderr, "usage: unix_echo <socket path>\n");
		return 2;
	}
	strcpy(addr.sun_path, argv[1]);
	unlink(argv[1]);
	listener = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK, 0);
	if (listener < 0 || bind(listener, (struct sockaddr *) &addr, sizeof(addr)) < 0 ||
		listen(listener, 128) < 0)
	{
		perror("unix_echo");
		return 1;
	}
	for (;;)
	{
		fds[0].fd = listener;
		fds[0].events = POLLIN;
		for (int i = 0; i < nconns; i++)
		{
			fds[i + 1].fd = conns[i].fd;
			fds[i + 1].events = POLLIN | (conns[i].out_end > conns[i].out_start ? POLLOUT : 0);
		}
		if (poll(fds, nconns + 1, -1) < 0)
		{
			if (errno == EINTR)
				continue;
			perror("poll");
			return 1;
		}
		for (int i = 0; i < nconns; i++)
		{
			Connection *c = &conns[i];
			bool		closed = false;

			if (fds[i + 1].revents & (POLLIN | POLLHUP | POLLERR))
			{
				ssize_t		n;

				grow(&c->in, &c->in_size, c->in_end + 65536);
				n = read(c->fd, c->in + c->in_end, c->in_size - c->in_end);
				if (n > 0)
				{
					c->in_end += n;
					answer(c);
				}
				else if (n == 0 || (errno != EAGAIN && errno != EINTR))
					closed = true;
			}
			while (!closed && c->out_end > c->out_start)
			{
				ssize_t		n = write(c->fd, c->out + c->out_start, c->out_end - c->out_start);

				if (n > 0)
					c->out_start += n;
				else if (n < 0 && errno == EAGAIN)
					break;
				else
					closed = true;
			}
			if (c->out_start == c->out_end)
				c->out_start = c->out_end = 0;
			if (closed)
			{
				close(c->fd);
				free(c->in);
				free(c->out);
				conns[i] = conns[--nconns];
				fds[i + 1] = fds[nconns + 1];
				i--;
			}
		}
		if (fds[0].revents & POLLIN)
		{
			int			fd;

			while (nconns < MAX_CONNECTIONS &&
				   (fd = accept4(listener, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC)) >= 0)
			{
				Connection *c = &conns[nconns++];

				memset(c, 0, sizeof(*c));
				c->fd = fd;
				c->in_size = c->out_size = 65536;
				c->in = malloc(c->in_size);
				c->out = malloc(c->out_size);
			}
		}
	}
}
