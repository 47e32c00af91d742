/*
 * qcow2fs_codec: decompresses one qcow2 compressed cluster on libuv's thread pool, with the
 * system's libzstd and libdeflate. The JS thread only queues the job and is told the result, so
 * several clusters decode at once on other cores while it serves FUSE requests.
 *
 *   decompress(type, src, dst) -> Promise<number>
 *
 * type: the header's compression_type: 0 = zlib (raw deflate), 1 = zstd (one or more frames). src: the compressed bytes (may
 * run past the end of the stream: a descriptor rounds its length up to 512-byte sectors). dst:
 * where the cluster goes; its length is the most that may be written (the cluster size). The
 * promise resolves with the number of bytes written (>= 0), or a negative code for corrupt
 * data (see codec.ts: CODEC_* below); it rejects only on a bad call. Nothing is ever written
 * past dst's end, whatever src holds.
 *
 * Both arrays must stay untouched until the promise settles; we hold references to them, so
 * they are not collected meanwhile.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <node_api.h>
#include <libdeflate.h>
#include <zstd.h>
#include <zstd_errors.h>

enum {
  TYPE_ZLIB = 0,
  TYPE_ZSTD = 1,
};

/* Result codes (negative: the data is corrupt). Keep in step with src/qcow2/native-codec.ts. */
enum {
  CODEC_CORRUPT = -1,   /* the decoder rejected the data */
  CODEC_OVERFLOW = -2,  /* the data decodes to more than dst holds */
  CODEC_TRUNCATED = -3, /* the input ends inside a zstd frame */
  CODEC_NOMEM = -4,     /* the decoder's context could not be allocated */
};

/*
 * One decoder context per pool thread, made on first use and kept (pool threads live as long
 * as the process): no allocation per cluster. __thread keeps jobs on different threads apart.
 */
static __thread ZSTD_DCtx *zstd_ctx;
static __thread struct libdeflate_decompressor *deflate_ctx;

/*
 * zlib (the header's name for raw deflate): one stream, decoded whole with libdeflate (twice
 * as fast as zlib's inflate here). Bytes after the stream's final block are ignored; a stream
 * that needs input past src's end is corrupt (libdeflate never decodes made-up bytes).
 */
static int64_t deflate_cluster(const uint8_t *src, size_t src_len, uint8_t *dst, size_t dst_len) {
  if (!deflate_ctx) deflate_ctx = libdeflate_alloc_decompressor();
  if (!deflate_ctx) return CODEC_NOMEM;
  size_t in_used = 0, out = 0;
  enum libdeflate_result r = libdeflate_deflate_decompress_ex(deflate_ctx, src, src_len, dst, dst_len, &in_used, &out);
  if (r == LIBDEFLATE_SUCCESS) return (int64_t)out;
  if (r == LIBDEFLATE_INSUFFICIENT_SPACE) return CODEC_OVERFLOW;
  return CODEC_CORRUPT;
}

/* zstd: frames one after another until dst is full or a frame decodes to nothing. */
static int64_t zstd_cluster(const uint8_t *src, size_t src_len, uint8_t *dst, size_t dst_len) {
  if (!zstd_ctx) zstd_ctx = ZSTD_createDCtx();
  if (!zstd_ctx) return CODEC_NOMEM;
  size_t in = 0, out = 0;
  while (out < dst_len) {
    /* The frame's exact length (walks the block headers); an error when src ends inside it. */
    size_t frame = ZSTD_findFrameCompressedSize(src + in, src_len - in);
    if (ZSTD_isError(frame)) return CODEC_TRUNCATED;
    /* Decodes that one frame; fails (never writes past) when it holds more than the space left. */
    size_t r = ZSTD_decompressDCtx(zstd_ctx, dst + out, dst_len - out, src + in, frame);
    if (ZSTD_isError(r)) {
      return ZSTD_getErrorCode(r) == ZSTD_error_dstSize_tooSmall ? CODEC_OVERFLOW : CODEC_CORRUPT;
    }
    if (r == 0) break;
    out += r;
    in += frame;
  }
  return (int64_t)out;
}

typedef struct {
  napi_async_work work;
  napi_deferred deferred;
  napi_ref src_ref;
  napi_ref dst_ref;
  int32_t type;
  const uint8_t *src;
  size_t src_len;
  uint8_t *dst;
  size_t dst_len;
  int64_t result;
} Job;

static void execute(napi_env env, void *data) {
  (void)env;
  Job *job = data;
  job->result = job->type == TYPE_ZSTD ? zstd_cluster(job->src, job->src_len, job->dst, job->dst_len)
                                       : deflate_cluster(job->src, job->src_len, job->dst, job->dst_len);
}

static void complete(napi_env env, napi_status status, void *data) {
  Job *job = data;
  napi_value value;
  if (status == napi_ok) {
    napi_create_int64(env, job->result, &value);
    napi_resolve_deferred(env, job->deferred, value);
  } else {
    napi_value msg;
    napi_create_string_utf8(env, "qcow2fs_codec: the job was cancelled", NAPI_AUTO_LENGTH, &msg);
    napi_create_error(env, NULL, msg, &value);
    napi_reject_deferred(env, job->deferred, value);
  }
  napi_delete_reference(env, job->src_ref);
  napi_delete_reference(env, job->dst_ref);
  napi_delete_async_work(env, job->work);
  free(job);
}

static int uint8_array(napi_env env, napi_value v, void **data, size_t *len) {
  napi_typedarray_type type;
  napi_value ab;
  size_t byte_offset;
  return napi_get_typedarray_info(env, v, &type, len, data, &ab, &byte_offset) == napi_ok && type == napi_uint8_array;
}

static napi_value decompress(napi_env env, napi_callback_info info) {
  size_t argc = 3;
  napi_value argv[3];
  int32_t type;
  void *src, *dst;
  size_t src_len, dst_len;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc != 3 ||
      napi_get_value_int32(env, argv[0], &type) != napi_ok || (type != TYPE_ZLIB && type != TYPE_ZSTD) ||
      !uint8_array(env, argv[1], &src, &src_len) || !uint8_array(env, argv[2], &dst, &dst_len)) {
    napi_throw_type_error(env, NULL, "expected (type 0|1, Uint8Array src, Uint8Array dst)");
    return NULL;
  }
  Job *job = calloc(1, sizeof *job);
  if (!job) {
    napi_throw_error(env, NULL, "qcow2fs_codec: out of memory");
    return NULL;
  }
  job->type = type;
  job->src = src;
  job->src_len = src_len;
  job->dst = dst;
  job->dst_len = dst_len;
  napi_value promise, name;
  napi_create_string_utf8(env, "qcow2fs_codec", NAPI_AUTO_LENGTH, &name);
  if (napi_create_reference(env, argv[1], 1, &job->src_ref) != napi_ok ||
      napi_create_reference(env, argv[2], 1, &job->dst_ref) != napi_ok ||
      napi_create_promise(env, &job->deferred, &promise) != napi_ok ||
      napi_create_async_work(env, NULL, name, execute, complete, job, &job->work) != napi_ok ||
      napi_queue_async_work(env, job->work) != napi_ok) {
    /* Not reached in practice (only on V8 allocation failure); the job leaks rather than risk
     * freeing something still referenced. */
    napi_throw_error(env, NULL, "qcow2fs_codec: cannot queue the job");
    return NULL;
  }
  return promise;
}

static napi_value init(napi_env env, napi_value exports) {
  napi_property_descriptor props[] = {
    {"decompress", NULL, decompress, NULL, NULL, NULL, napi_default, NULL},
  };
  napi_define_properties(env, exports, sizeof props / sizeof props[0], props);
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, init)
