/*-------------------------------------------------------------------------
 *
 * sandbox.h
 *		The redo child's sandbox: entered after start-up, before the first
 *		request is read (see sandbox.c).
 *
 * Copyright (c) 2026, the walredod developers.
 *-------------------------------------------------------------------------
 */
#ifndef WALREDOD_SANDBOX_H
#define WALREDOD_SANDBOX_H

#include "storage/relfilenode.h"

/* From _PG_init, before the "walredod" GUC prefix is reserved. */
extern void walredod_sandbox_define_gucs(void);

/*
 * Enter the sandbox.  listen_fd is an inherited listening socket the child
 * may accept connections on (-1: none); no other socket call is allowed.
 */
extern void walredod_sandbox_enter(int listen_fd);

/* At the start of each request: run the sandbox probes if it names their relation. */
extern void walredod_sandbox_probe(Oid relnode);

#endif							/* WALREDOD_SANDBOX_H */
