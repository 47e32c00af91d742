/*
 * qcow2fs_codec: decompresses one qcow2 compressed cluster on libuv's thread pool, with the
 * system's libzstd and libdeflate. The JS thread only queues the job and is told the result, so
 * several clusters decode at once on other cores while it serves FUSE requests.
 *
 *   decompress(type, src, dst) -> Promise<number>
 *   decompressFile(type, fd, position, length, dst) -> Promise<number>
 *
 * type: the header's compression_type: 0 = zlib (raw deflate), 1 = zstd (one or more frames). src: the compressed bytes (may
 * run past the end of the stream: a descriptor rounds its length up to 512-byte sectors). dst:
 * where the cluster goes; its length is the most that may be written (the cluster size). The
 * promise resolves with the number of bytes written (>= 0), or a negative code for corrupt
 * data (see codec.ts: CODEC_* below); it rejects only on a bad call. Nothing is ever written
 * past dst's end, whatever src holds.
 *
 * decompressFile first reads the `length` compressed bytes at `position` of file descriptor fd
 * (pread, on the same pool thread, into a buffer of that thread; bytes past the end of the file
 * read as zeros): no JS allocation and no JS-thread copy per cluster. A failed read resolves
 * with CODEC_IO. The descriptor must stay open until the promise settles.
 *
 * The arrays must stay untouched until the promise settles; we hold references to them, so
 * they are not collected meanwhile.
 */
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <node_api.h>
#include <libdeflate.h>
#include <zstd.h>
#include <zstd_errors.h>
#include <zlib.h>

enum {
  TYPE_ZLIB = 0,
  TYPE_ZSTD = 1,
};

/* Result codes (negative: the data is corrupt). Keep in step with src/qcow2/native-codec.ts. */
enum {
  CODEC_CORRUPT = -1,   /* the decoder rejected the data */
  CODEC_OVERFLOW = -2,  /* the data decodes to more than dst holds */
  CODEC_BAD_FRAME = -3, /* no complete zstd frame at this point (bad magic, truncated) */
  CODEC_NOMEM = -4,     /* the decoder's context could not be allocated */
  CODEC_IO = -5,        /* reading the compressed bytes failed */
};

/*
 * One decoder context per thread, made on first use and kept while the thread lives: no
 * allocation per cluster. Besides libuv's pool threads, the FUSE binding's worker threads call
 * in (qcow2fs_codec_api below); those may exit, so the state is freed with its thread.
 */
typedef struct {
  ZSTD_DCtx *zstd;
  struct libdeflate_decompressor *deflate;
  uint8_t *read_buf; /* compressed bytes read by decode_file (grown to the largest cluster seen) */
  size_t read_cap;
} ThreadState;

static pthread_key_t state_key;
static pthread_once_t state_once = PTHREAD_ONCE_INIT;

static void free_state(void *p) {
  ThreadState *t = p;
  ZSTD_freeDCtx(t->zstd);
  if (t->deflate) libdeflate_free_decompressor(t->deflate);
  free(t->read_buf);
  free(t);
}

static void make_key(void) {
  (void)pthread_key_create(&state_key, free_state);
}

static ThreadState *thread_state(void) {
  pthread_once(&state_once, make_key);
  ThreadState *t = pthread_getspecific(state_key);
  if (!t) {
    t = calloc(1, sizeof *t);
    if (t && pthread_setspecific(state_key, t) != 0) {
      free(t);
      t = NULL;
    }
  }
  return t;
}

/* Compressed bytes up to this size keep their buffer in the thread for the next cluster. */
#define KEEP_READ_BUF (256u << 10)

/* Reads length bytes at position into this thread's buffer; zeros past the end of the file. */
static int read_compressed(int fd, int64_t position, size_t length, const uint8_t **out) {
  if (length == 0) return CODEC_CORRUPT;
  ThreadState *t = thread_state();
  if (!t) return CODEC_NOMEM;
  if (length > t->read_cap) {
    uint8_t *p = realloc(t->read_buf, length);
    if (!p) return CODEC_NOMEM;
    t->read_buf = p;
    t->read_cap = length;
  }
  uint8_t *read_buf = t->read_buf;
  size_t got = 0;
  while (got < length) {
    ssize_t n = pread(fd, read_buf + got, length - got, (off_t)(position + (int64_t)got));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return CODEC_IO;
    if (n == 0) break;
    got += (size_t)n;
  }
  memset(read_buf + got, 0, length - got);
  *out = read_buf;
  return 0;
}

/* After a decode: a big read buffer is not kept (threads may be many: see decode_file). */
static void trim_read_buf(void) {
  ThreadState *t = pthread_getspecific(state_key);
  if (t && t->read_cap > KEEP_READ_BUF) {
    free(t->read_buf);
    t->read_buf = NULL;
    t->read_cap = 0;
  }
}

/*
 * What QEMU accepts (qcow2 "zlib" = raw deflate): whatever fills the cluster. zlib's inflate
 * into exactly one cluster succeeds once the output is full, whether the stream ends there,
 * goes on (decodes to more than a cluster: the rest is ignored) or would need input past the
 * compressed bytes. Only the rare streams that libdeflate does not decode to exactly one cluster
 * come here.
 */
static int64_t inflate_cluster(const uint8_t *src, size_t src_len, uint8_t *dst, size_t dst_len) {
  z_stream z;
  memset(&z, 0, sizeof z);
  if (inflateInit2(&z, -15) != Z_OK) return CODEC_NOMEM;
  z.next_in = (Bytef *)src;
  z.avail_in = (uInt)src_len;
  z.next_out = dst;
  z.avail_out = (uInt)dst_len;
  int r = inflate(&z, Z_FINISH);
  size_t out = dst_len - z.avail_out;
  inflateEnd(&z);
  if ((r == Z_STREAM_END || r == Z_BUF_ERROR) && out == dst_len) return (int64_t)out;
  return r == Z_STREAM_END ? (int64_t)out : CODEC_CORRUPT;
}

/*
 * zlib (the header's name for raw deflate): one stream, decoded whole with libdeflate (twice
 * as fast as zlib's inflate here). Bytes after the stream's final block are ignored. A stream
 * that does not end within the cluster (longer, or needing input past src's end) gets zlib's
 * verdict (inflate_cluster).
 */
static int64_t deflate_cluster(const uint8_t *src, size_t src_len, uint8_t *dst, size_t dst_len) {
  ThreadState *t = thread_state();
  if (!t) return CODEC_NOMEM;
  if (!t->deflate) t->deflate = libdeflate_alloc_decompressor();
  struct libdeflate_decompressor *deflate_ctx = t->deflate;
  if (!deflate_ctx) return CODEC_NOMEM;
  size_t in_used = 0, out = 0;
  enum libdeflate_result r = libdeflate_deflate_decompress_ex(deflate_ctx, src, src_len, dst, dst_len, &in_used, &out);
  if (r == LIBDEFLATE_SUCCESS) return (int64_t)out;
  return inflate_cluster(src, src_len, dst, dst_len);
}

/*
 * zstd: frames one after another until dst is full (as QEMU's streaming decoder reads them:
 * skippable and empty frames pass; a frame that does not fit, or bytes that are not a complete
 * frame before dst is full, are corrupt).
 */
static int64_t zstd_cluster(const uint8_t *src, size_t src_len, uint8_t *dst, size_t dst_len) {
  ThreadState *t = thread_state();
  if (!t) return CODEC_NOMEM;
  if (!t->zstd) t->zstd = ZSTD_createDCtx();
  ZSTD_DCtx *zstd_ctx = t->zstd;
  if (!zstd_ctx) return CODEC_NOMEM;
  size_t in = 0, out = 0;
  while (out < dst_len) {
    /* The frame's exact length (walks the block headers); an error when src ends inside it. */
    size_t frame = ZSTD_findFrameCompressedSize(src + in, src_len - in);
    if (ZSTD_isError(frame)) return CODEC_BAD_FRAME;
    /* Decodes that one frame; fails (never writes past) when it holds more than the space left. */
    size_t r = ZSTD_decompressDCtx(zstd_ctx, dst + out, dst_len - out, src + in, frame);
    if (ZSTD_isError(r)) {
      return ZSTD_getErrorCode(r) == ZSTD_error_dstSize_tooSmall ? CODEC_OVERFLOW : CODEC_CORRUPT;
    }
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
  int32_t fd; /* >= 0: read src_len bytes at position first */
  int64_t position;
  const uint8_t *src;
  size_t src_len;
  uint8_t *dst;
  size_t dst_len;
  int64_t result;
} Job;

static int64_t decode(int32_t type, const uint8_t *src, size_t src_len, uint8_t *dst, size_t dst_len) {
  return type == TYPE_ZSTD ? zstd_cluster(src, src_len, dst, dst_len) : deflate_cluster(src, src_len, dst, dst_len);
}

/* Reads length compressed bytes at position of fd and decodes them into dst (any thread). */
static int64_t decode_file(int32_t type, int32_t fd, int64_t position, size_t length, uint8_t *dst, size_t dst_len) {
  if (type != TYPE_ZLIB && type != TYPE_ZSTD) return CODEC_CORRUPT;
  const uint8_t *src;
  int r = read_compressed(fd, position, length, &src);
  if (r < 0) return r;
  int64_t res = decode(type, src, length, dst, dst_len);
  trim_read_buf();
  return res;
}

static void execute(napi_env env, void *data) {
  (void)env;
  Job *job = data;
  job->result = job->fd >= 0 ? decode_file(job->type, job->fd, job->position, job->src_len, job->dst, job->dst_len)
                             : decode(job->type, job->src, job->src_len, job->dst, job->dst_len);
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
  if (job->src_ref) napi_delete_reference(env, job->src_ref);
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

/* Queues the job; src_value is the compressed bytes' array (NULL for decompressFile). */
static napi_value queue(napi_env env, Job *job, napi_value src_value, napi_value dst_value) {
  napi_value promise, name;
  napi_create_string_utf8(env, "qcow2fs_codec", NAPI_AUTO_LENGTH, &name);
  if ((src_value && napi_create_reference(env, src_value, 1, &job->src_ref) != napi_ok) ||
      napi_create_reference(env, dst_value, 1, &job->dst_ref) != napi_ok ||
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

static Job *new_job(napi_env env, int32_t type) {
  Job *job = calloc(1, sizeof *job);
  if (!job) napi_throw_error(env, NULL, "qcow2fs_codec: out of memory");
  else job->type = type;
  return job;
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
  Job *job = new_job(env, type);
  if (!job) return NULL;
  job->fd = -1;
  job->src = src;
  job->src_len = src_len;
  job->dst = dst;
  job->dst_len = dst_len;
  return queue(env, job, argv[1], argv[2]);
}

/* The most compressed bytes one cluster may take (a descriptor's limit for 2 MiB clusters). */
#define MAX_COMPRESSED (8u << 20)

static napi_value decompress_file(napi_env env, napi_callback_info info) {
  size_t argc = 5;
  napi_value argv[5];
  int32_t type, fd;
  int64_t position, length;
  void *dst;
  size_t dst_len;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc != 5 ||
      napi_get_value_int32(env, argv[0], &type) != napi_ok || (type != TYPE_ZLIB && type != TYPE_ZSTD) ||
      napi_get_value_int32(env, argv[1], &fd) != napi_ok || fd < 0 || napi_get_value_int64(env, argv[2], &position) != napi_ok ||
      position < 0 || napi_get_value_int64(env, argv[3], &length) != napi_ok || length < 0 || length > MAX_COMPRESSED ||
      !uint8_array(env, argv[4], &dst, &dst_len)) {
    napi_throw_type_error(env, NULL, "expected (type 0|1, fd, position, length <= 8 MiB, Uint8Array dst)");
    return NULL;
  }
  Job *job = new_job(env, type);
  if (!job) return NULL;
  job->fd = fd;
  job->position = position;
  job->src_len = (size_t)length;
  job->dst = dst;
  job->dst_len = dst_len;
  return queue(env, job, NULL, argv[4]);
}

/*
 * For the FUSE binding (vendor/fuse-native), which decodes compressed clusters on its own worker
 * threads: `api()` returns an external holding this table, passed on to the binding by JS, so
 * the binding needs no link to libzstd or libdeflate. Keep in step with qcow2fs_codec_api_t in
 * vendor/fuse-native/fuse-native.c.
 */
typedef struct {
  uint32_t version;
  int64_t (*decode_file)(int32_t type, int32_t fd, int64_t position, size_t length, uint8_t *dst, size_t dst_len);
} CodecApi;

static const CodecApi codec_api = {1, decode_file};

static napi_value api(napi_env env, napi_callback_info info) {
  (void)info;
  napi_value v;
  if (napi_create_external(env, (void *)&codec_api, NULL, NULL, &v) != napi_ok) return NULL;
  return v;
}

static napi_value init(napi_env env, napi_value exports) {
  napi_property_descriptor props[] = {
    {"api", NULL, api, NULL, NULL, NULL, napi_default, NULL},
    {"decompress", NULL, decompress, NULL, NULL, NULL, napi_default, NULL},
    {"decompressFile", NULL, decompress_file, NULL, NULL, NULL, napi_default, NULL},
  };
  napi_define_properties(env, exports, sizeof props / sizeof props[0], props);
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, init)
