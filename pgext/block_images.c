/*-------------------------------------------------------------------------
 *
 * block_images.c
 *		Full-page images of a decoded record, made ready for redo before it
 *		runs.
 *
 * Redo restores a block's image with RestoreBlockImage, which decompresses
 * it on every call; for zstd it creates a new decompression context each
 * time, and creating one runs CPUID twice: under a hypervisor each is a VM
 * exit, and together they cost more than the rest of a short request.  So
 * the child decompresses the images redo will restore on the target itself,
 * once, with one context kept for its life, and hands redo the plain page
 * (RestoreBlockImage then only copies it).  Doing that while the request is
 * checked also makes an image that does not decompress to its page a refusal
 * instead of a failure in the middle of redo.
 *
 * Images of the other blocks a record references are restored into dummy
 * relations and thrown away after the record; redo of one block never reads
 * another block's page (any block may be skipped as already applied), so
 * those images are blanked: restored as a page of zeros, which costs a
 * memset instead of a decompression.
 *
 * Copyright (c) 2026, the walredod developers.
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xlogrecord.h"
#include "common/pg_lzcompress.h"

#ifdef USE_LZ4
#include <lz4.h>
#endif
#ifdef USE_ZSTD
#include <zstd.h>
#endif

#include "block_images.h"

#define BKPIMAGE_COMPRESS_ANY \
	(BKPIMAGE_COMPRESS_PGLZ | BKPIMAGE_COMPRESS_LZ4 | BKPIMAGE_COMPRESS_ZSTD)

#ifdef USE_ZSTD
static ZSTD_DCtx *zstd_context;
#endif

/* Set up what decompression needs for the life of the process. */
void
block_images_init(void)
{
#ifdef USE_ZSTD
	zstd_context = ZSTD_createDCtx();
	if (zstd_context == NULL)
		ereport(FATAL,
				(errcode(ERRCODE_OUT_OF_MEMORY),
				 errmsg("walredod: out of memory creating a zstd decompression context")));
#endif
}

bool
block_image_is_compressed(const DecodedBkpBlock *blk)
{
	return (blk->bimg_info & BKPIMAGE_COMPRESS_ANY) != 0;
}

/*
 * Decompress a compressed image into 'raw', which has room for 'expected'
 * bytes.  Returns how many bytes it produced, -1 when the data is not a
 * valid stream of its method; sets *method to the method's name.
 */
static int
decompress_image_bytes(const DecodedBkpBlock *blk, char *raw, int expected,
					   const char **method)
{
	if (blk->bimg_info & BKPIMAGE_COMPRESS_PGLZ)
	{
		*method = "pglz";
		return pglz_decompress(blk->bkp_image, blk->bimg_len, raw, expected,
							   true);
	}
	if (blk->bimg_info & BKPIMAGE_COMPRESS_LZ4)
	{
		*method = "lz4";
#ifdef USE_LZ4
		return LZ4_decompress_safe(blk->bkp_image, raw, blk->bimg_len,
								   expected);
#else
		ereport(ERROR,
				(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
				 errmsg("walredod: a block image is compressed with lz4, which this PostgreSQL was built without")));
#endif
	}
	*method = "zstd";
#ifdef USE_ZSTD
	{
		size_t		produced = ZSTD_decompressDCtx(zstd_context, raw, expected,
												   blk->bkp_image,
												   blk->bimg_len);

		return ZSTD_isError(produced) ? -1 : (int) produced;
	}
#else
	ereport(ERROR,
			(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
			 errmsg("walredod: a block image is compressed with zstd, which this PostgreSQL was built without")));
#endif
}

/*
 * Refuse an image whose hole reaches past the end of the page.  The WAL
 * reader checks the hole's flags but not where it ends, and restoring such
 * an image would write past the page's buffer.
 */
void
check_block_image(const DecodedBkpBlock *blk, int block_id, XLogRecPtr end_lsn)
{
	if ((int) blk->hole_offset + blk->hole_length > BLCKSZ)
		ereport(ERROR,
				(errcode(ERRCODE_DATA_CORRUPTED),
				 errmsg("walredod: image of block %d of the record at end LSN %X/%X has a hole (offset %u, length %u) past the end of the page",
						block_id, LSN_FORMAT_ARGS(end_lsn),
						blk->hole_offset, blk->hole_length)));
}

/*
 * Decompress block 'block_id''s image (of the record ending at 'end_lsn')
 * into 'page' (BLCKSZ bytes, holes zero-filled) and point the block at it as
 * a plain image without a hole.  An image that does not decompress to
 * exactly its page, less its hole, is refused as corrupt data.
 */
void
decompress_block_image(DecodedBkpBlock *blk, char *page, int block_id,
					   XLogRecPtr end_lsn)
{
	PGAlignedBlock raw;
	int			expected;
	int			produced;
	const char *method;

	Assert(block_image_is_compressed(blk));
	check_block_image(blk, block_id, end_lsn);
	expected = BLCKSZ - blk->hole_length;
	produced = decompress_image_bytes(blk, raw.data, expected, &method);
	if (produced != expected)
		ereport(ERROR,
				(errcode(ERRCODE_DATA_CORRUPTED),
				 errmsg("walredod: image of block %d of the record at end LSN %X/%X does not decompress (%s) to the %d bytes it stands for",
						block_id, LSN_FORMAT_ARGS(end_lsn), method, expected)));

	memcpy(page, raw.data, blk->hole_offset);
	memset(page + blk->hole_offset, 0, blk->hole_length);
	memcpy(page + blk->hole_offset + blk->hole_length,
		   raw.data + blk->hole_offset,
		   BLCKSZ - (blk->hole_offset + blk->hole_length));

	blk->bkp_image = page;
	blk->bimg_len = BLCKSZ;
	blk->hole_offset = 0;
	blk->hole_length = 0;
	blk->bimg_info &= ~(BKPIMAGE_COMPRESS_ANY | BKPIMAGE_HAS_HOLE);
}

/*
 * Make an image restore as a page of zeros: all hole, nothing compressed.
 * Redo treats a restored block as done and does not touch it further.
 */
void
blank_block_image(DecodedBkpBlock *blk)
{
	blk->bimg_len = 0;
	blk->hole_offset = 0;
	blk->hole_length = BLCKSZ;
	blk->bimg_info &= ~BKPIMAGE_COMPRESS_ANY;
	blk->bimg_info |= BKPIMAGE_HAS_HOLE;
}
