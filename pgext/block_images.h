/*-------------------------------------------------------------------------
 *
 * block_images.h
 *		Full-page images of a decoded record, made ready for redo before it
 *		runs: the target's decompressed once, the other blocks' blanked.
 *
 * Copyright (c) 2026, the walredod developers.
 *-------------------------------------------------------------------------
 */
#ifndef BLOCK_IMAGES_H
#define BLOCK_IMAGES_H

#include "access/xlogreader.h"

extern void block_images_init(void);
extern bool block_image_is_compressed(const DecodedBkpBlock *blk);
extern void check_block_image(const DecodedBkpBlock *blk, int block_id,
							  XLogRecPtr end_lsn);
extern void decompress_block_image(DecodedBkpBlock *blk, char *page,
								   int block_id, XLogRecPtr end_lsn);
extern void blank_block_image(DecodedBkpBlock *blk);

#endif							/* BLOCK_IMAGES_H */
