#define FUSE_USE_VERSION 29

#include <uv.h>
#include <node_api.h>
#include <napi-macros.h>

#include <string.h>
#include <stdio.h>
#include <stdlib.h>
#include <assert.h>

#include <fuse.h>
#include <fuse_opt.h>
#include <fuse_common.h>
#include <fuse_lowlevel.h>

#include <unistd.h>
#include <sys/wait.h>
#include <pthread.h>
#include <errno.h>
#include <stdint.h>
#include <sys/uio.h>
#include <sched.h>
#include <fuse_kernel.h>

static int IS_ARRAY_BUFFER_DETACH_SUPPORTED = 0;
// qcow2fs: lets the JS side tell this build from the stock prebuilt binary.
static const uint32_t qcow2fs_patched = 1;

napi_status napi_detach_arraybuffer(napi_env env, napi_value buf);

#define FUSE_NATIVE_CALLBACK(fn, blk)\
  napi_env env = ft->env;\
  napi_handle_scope scope;\
  napi_open_handle_scope(env, &scope);\
  napi_value ctx;\
  napi_get_reference_value(env, ft->ctx, &ctx);\
  napi_value callback;\
  napi_get_reference_value(env, fn, &callback);\
  blk\
  napi_close_handle_scope(env, scope);

#define FUSE_NATIVE_HANDLER(name, blk)\
  fuse_thread_locals_t *l = get_thread_locals();\
  l->op = op_##name;\
  l->op_fn = fuse_native_dispatch_##name;\
  blk\
  uv_async_send(&(l->async));\
  uv_sem_wait(&(l->sem));\
  return l->res;

#define FUSE_METHOD(name, callbackArgs, signalArgs, signature, callBlk, callbackBlk, signalBlk)\
  static void fuse_native_dispatch_##name (uv_async_t* handle, fuse_thread_locals_t* l, fuse_thread_t* ft) {\
    uint32_t op = op_##name;\
    FUSE_NATIVE_CALLBACK(ft->handlers[op], {\
      napi_value argv[callbackArgs + 2];\
      napi_get_reference_value(env, l->self, &(argv[0]));\
      napi_create_uint32(env, l->op, &(argv[1]));\
      callbackBlk\
      NAPI_MAKE_CALLBACK(env, NULL, ctx, callback, callbackArgs + 2, argv, NULL)\
    })\
  }\
  NAPI_METHOD(fuse_native_signal_##name) {\
    NAPI_ARGV(signalArgs + 2)\
    NAPI_ARGV_BUFFER_CAST(fuse_thread_locals_t *, l, 0);\
    NAPI_ARGV_INT32(res, 1);\
    signalBlk\
    l->res = res;\
    uv_sem_post(&(l->sem));\
    return NULL;\
  }\
  static int fuse_native_##name signature {\
    FUSE_NATIVE_HANDLER(name, callBlk)\
  }

#define FUSE_METHOD_VOID(name, callbackArgs, signalArgs, signature, callBlk, callbackBlk)\
  FUSE_METHOD(name, callbackArgs, signalArgs, signature, callBlk, callbackBlk, {})

#define FUSE_UINT64_TO_INTS_ARGV(n, pos)\
  uint32_t low##pos = n % 4294967296;\
  uint32_t high##pos = (n - low##pos) / 4294967296;\
  napi_create_uint32(env, low##pos, &(argv[pos]));\
  napi_create_uint32(env, high##pos, &(argv[pos + 1]));


// Opcodes

static const uint32_t op_init = 0;
static const uint32_t op_error = 1;
static const uint32_t op_access = 2;
static const uint32_t op_statfs = 3;
static const uint32_t op_fgetattr = 4;
static const uint32_t op_getattr = 5;
static const uint32_t op_flush = 6;
static const uint32_t op_fsync = 7;
static const uint32_t op_fsyncdir = 8;
static const uint32_t op_readdir = 9;
static const uint32_t op_truncate = 10;
static const uint32_t op_ftruncate = 11;
static const uint32_t op_utimens = 12;
static const uint32_t op_readlink = 13;
static const uint32_t op_chown = 14;
static const uint32_t op_chmod = 15;
static const uint32_t op_mknod = 16;
static const uint32_t op_setxattr = 17;
static const uint32_t op_getxattr = 18;
static const uint32_t op_listxattr = 19;
static const uint32_t op_removexattr = 20;
static const uint32_t op_open = 21;
static const uint32_t op_opendir = 22;
static const uint32_t op_read = 23;
static const uint32_t op_write = 24;
static const uint32_t op_release = 25;
static const uint32_t op_releasedir = 26;
static const uint32_t op_create = 27;
static const uint32_t op_unlink = 28;
static const uint32_t op_rename = 29;
static const uint32_t op_link = 30;
static const uint32_t op_symlink = 31;
static const uint32_t op_mkdir = 32;
static const uint32_t op_rmdir = 33;
// qcow2fs: fallocate (discard and zeroing of the raw file: fstrim, blkdiscard, mkfs through a loop device).
static const uint32_t op_fallocate = 34;

// Data structures

/*
 * qcow2fs: a direct read map (see qcow2fs_fast_read). A direct-mapped table of guest clusters of
 * one file of the mount, each either "host bytes at (fd, host offset)" or "zeros", filled and
 * invalidated by the JS engine (the only writer; the JS thread), read by libfuse's worker
 * threads. Each slot is a seqlock: the writer makes seq odd, changes the slot, makes it even.
 */
#define QCOW2FS_MAX_FASTMAPS 16

#define QCOW2FS_SLOT_WRITABLE 0x40000000
#define QCOW2FS_SLOT_FD_MASK 0x3fffffff

typedef struct {
  uint32_t seq;
  int32_t fd;     // -1: the cluster reads as zeros; else fd | QCOW2FS_SLOT_WRITABLE if writes
                  // may go to the same host bytes (a cluster the image's active layer owns)
  uint64_t key;   // guest cluster index + 1; 0: empty
  uint64_t host;  // host offset of the cluster's first byte
} qcow2fs_slot_t;

// A slot's fd: zeros, and a write may allocate the cluster from the map's pool of fresh clusters.
#define QCOW2FS_SLOT_ALLOCATABLE (-2)
#define QCOW2FS_MAX_POOL_RANGES 2
// Allocations the log holds before allocating writes go to JS (which takes the log).
#define QCOW2FS_ALLOC_LOG_PAIRS 8192

/*
 * Compressed clusters (see qcow2fs_zread): a slot's fd word is fd | QCOW2FS_SLOT_COMPRESSED
 * (| QCOW2FS_SLOT_ZSTD for zstd, else zlib), its host word the compressed bytes' offset | the
 * count of 512-byte sectors they touch << QCOW2FS_CHOST_BITS (what fits a double exactly, as JS
 * passes it). Never writable.
 */
#define QCOW2FS_SLOT_COMPRESSED 0x20000000
#define QCOW2FS_SLOT_ZSTD 0x10000000
#define QCOW2FS_SLOT_CFD_MASK 0x0fffffff
#define QCOW2FS_CHOST_BITS 39

/* The decoder, from the codec addon (native/codec/codec.c: CodecApi), set by JS. */
typedef struct {
  uint32_t version;
  int64_t (*decode_file)(int32_t type, int32_t fd, int64_t position, size_t length, uint8_t *dst, size_t dst_len);
} qcow2fs_codec_api_t;

static const qcow2fs_codec_api_t *qcow2fs_codec = NULL;

/* A decoded cluster of the map's cache; key (fdw, hw) = the slot's words. */
enum { QCOW2FS_Z_FREE = 0, QCOW2FS_Z_QUEUED, QCOW2FS_Z_LOADING, QCOW2FS_Z_READY };

typedef struct {
  int32_t fdw;
  uint32_t state;
  uint32_t pins;   // readers copying out of buf, or waiting for it
  uint64_t hw;
  uint64_t gen;    // the cache's generation when claimed (quiesce starts a new one)
  uint64_t used;   // LRU tick
  uint8_t *buf;
} qcow2fs_zent_t;

// Decoded clusters kept per map: about this many bytes, in sets of up to 16 entries.
#define QCOW2FS_Z_CACHE_BYTES (4u << 20)
#define QCOW2FS_Z_MAX_ENTRIES 1024u
#define QCOW2FS_Z_WAYS 16u
// Read-ahead: sequential reads over compressed clusters decode this far ahead (at least 2 clusters).
#define QCOW2FS_Z_WINDOW (1u << 20)

typedef struct {
  uint64_t next;  // host offset of the next fresh cluster
  uint64_t end;
} qcow2fs_pool_range_t;

typedef struct {
  char path[1024];
  uint32_t cluster_bits;
  // Slot changes (JS publish/invalidate, a worker's allocation) and the pool and log below.
  pthread_mutex_t lock;
  // Fresh host clusters (zeros, refcount already taken by the engine) for allocating writes.
  int32_t pool_fd;
  qcow2fs_pool_range_t pool[QCOW2FS_MAX_POOL_RANGES];
  uint32_t n_pool;
  // Allocations done here that the engine has not taken yet: pairs (guest cluster, host offset).
  uint64_t *alloc_log;
  uint32_t alloc_cap;
  uint32_t alloc_len;
  uint64_t allocs;     // allocations done here, ever (under lock)
  // Called (JS, nonblocking) when a pool range is used up or the log is half full, once until
  // JS supplies a range or takes the log: so that it does before writes have to go to JS.
  napi_threadsafe_function low_tsfn;
  uint32_t low_signaled;
  uint64_t slot_mask;
  qcow2fs_slot_t *slots;
  uint64_t size;       // bytes; reads past it go to JS (atomic)
  uint32_t readers;    // fast reads in progress (atomic)
  uint32_t blocked;    // set while JS waits for readers to drain (atomic)
  uint32_t disabled;   // detached: every read goes to JS (atomic)
  uint64_t hits;       // reads answered here (atomic, relaxed)
  uint64_t misses;     // reads handed to JS (atomic, relaxed)
  uint64_t writes;     // writes done here (atomic; JS makes them durable on fsync)
  uint64_t write_misses; // writes handed to JS (atomic, relaxed)
  // Decoded compressed clusters (allocated on first use), under zlock; zcond: a load ended or an
  // entry was let go while zwaiting requests wait for room in their set.
  pthread_mutex_t zlock;
  pthread_cond_t zcond;
  uint32_t zwaiting;
  qcow2fs_zent_t *zents;
  uint32_t zsets;      // the cache's shape and the read-ahead window, set at attach
  uint32_t zways;
  uint64_t zwindow;
  uint64_t ztick;
  uint64_t zgen;
  uint64_t z_last_end; // read-ahead: end of the last read over compressed clusters (0: none)
  uint64_t z_ra_next;  // the next guest offset read-ahead may queue
  uint64_t z_decoded;  // clusters decoded here (atomic, relaxed)
  uint64_t z_ahead;    // of them by read-ahead (atomic, relaxed)
  uint64_t z_waits;    // reads that waited for room in the cache (under zlock)
} qcow2fs_fastmap_t;

typedef struct {
  napi_env env;
  pthread_t thread;
  pthread_attr_t attr;
  napi_ref ctx;
  napi_ref malloc;

  // Operation handlers
  napi_ref handlers[35];

  struct fuse *fuse;
  struct fuse_chan *ch;
  char mnt[1024];
  char mntopts[1024];
  int mounted;

  uv_async_t async;
  uv_mutex_t mut;
  uv_sem_t sem;

  // qcow2fs: what to add to libfuse's answer to the kernel's INIT (see qcow2fs_chan_send).
  uint32_t want_async_dio;
  uint32_t max_pages;
  uint64_t init_unique;
  uint32_t kernel_flags;
  uint32_t init_flags_sent;

  // qcow2fs: direct read maps, one per file that has one (published with a release store).
  qcow2fs_fastmap_t *fastmaps[QCOW2FS_MAX_FASTMAPS];
  uint32_t n_fastmaps;
} fuse_thread_t;

typedef struct {
  napi_ref self;

  // Opcode
  uint32_t op;
  void *op_fn;

  // Payloads
  const char *path;
  const char *dest;
  char *linkname;
  struct fuse_file_info *info;
  const void *buf;
  off_t offset;
  size_t len;
  mode_t mode;
  dev_t dev;
  uid_t uid;
  gid_t gid;
  size_t atime;
  size_t mtime;
  int32_t res;

  // Extended attributes
  const char *name;
  const char *value;
  char *list;
  size_t size;
  uint32_t position;
  int flags;

  // Stat + Statfs
  struct stat *stat;
  struct statvfs *statvfs;

  // Readdir
  fuse_fill_dir_t readdir_filler;

  // Internal bookkeeping
  fuse_thread_t *fuse;
  uv_sem_t sem;
  uv_async_t async;

} fuse_thread_locals_t;

static pthread_key_t thread_locals_key;
static fuse_thread_locals_t* get_thread_locals();

/*
 * qcow2fs: thread locals of exited libfuse threads, for reuse. libfuse 2.9's multithreaded loop
 * starts a thread whenever none is idle and ends threads when more than 10 are idle, so under a
 * queue depth above 10 threads come and go all the time. Each new thread used to allocate a new
 * fuse_thread_locals_t (a JS Buffer plus a uv_async_t registered with the loop, through a round
 * trip to the JS thread) that was never freed: memory grew and every loop wake-up scanned more
 * async handles. A thread that ends puts its locals here (pthread key destructor); the next new
 * thread takes them. Locals are only ever used by one thread at a time: a thread ends between
 * requests, after its last reply was signalled.
 */
static uv_mutex_t free_locals_mut;
static fuse_thread_locals_t *free_locals[256];
static size_t free_locals_count = 0;

static void release_thread_locals (void *data) {
  fuse_thread_locals_t *l = (fuse_thread_locals_t *) data;
  uv_mutex_lock(&free_locals_mut);
  if (free_locals_count < sizeof(free_locals) / sizeof(free_locals[0])) free_locals[free_locals_count++] = l;
  uv_mutex_unlock(&free_locals_mut);
}

static fuse_thread_locals_t *reuse_thread_locals (fuse_thread_t *ft) {
  fuse_thread_locals_t *l = NULL;
  uv_mutex_lock(&free_locals_mut);
  for (size_t i = free_locals_count; i-- > 0;) {
    if (free_locals[i]->fuse == ft) {
      l = free_locals[i];
      free_locals[i] = free_locals[--free_locals_count];
      break;
    }
  }
  uv_mutex_unlock(&free_locals_mut);
  return l;
}

// Helpers
// TODO: Extract into a separate file.

static uint64_t uint32s_to_uint64 (uint32_t **ints) {
  uint64_t low = *((*ints)++);
  uint64_t high = *((*ints)++);
  return high * 4294967296 + low;
}

static void uint32s_to_timespec (struct timespec* ts, uint32_t** ints) {
  uint64_t ms = uint32s_to_uint64(ints);
  ts->tv_sec = ms / 1000;
  ts->tv_nsec = (ms % 1000) * 1000000;
}

static uint64_t timespec_to_uint64 (const struct timespec* ts) {
  uint64_t ms = (ts->tv_sec * 1000) + (ts->tv_nsec / 1000000);
  return ms;
}

static void populate_stat (uint32_t *ints, struct stat* stat) {
  stat->st_mode = *ints++;
  stat->st_uid = *ints++;
  stat->st_gid = *ints++;
  stat->st_size = uint32s_to_uint64(&ints);
  stat->st_dev = *ints++;
  stat->st_nlink = *ints++;
  stat->st_ino = *ints++;
  stat->st_rdev = *ints++;
  stat->st_blksize = *ints++;
  stat->st_blocks = uint32s_to_uint64(&ints);
#ifdef __APPLE__
  uint32s_to_timespec(&stat->st_atimespec, &ints);
  uint32s_to_timespec(&stat->st_mtimespec, &ints);
  uint32s_to_timespec(&stat->st_ctimespec, &ints);
#else
  uint32s_to_timespec(&stat->st_atim, &ints);
  uint32s_to_timespec(&stat->st_mtim, &ints);
  uint32s_to_timespec(&stat->st_ctim, &ints);
#endif
}

static void populate_statvfs (uint32_t *ints, struct statvfs* statvfs) {
  statvfs->f_bsize = *ints++;
  statvfs->f_frsize = *ints++;
  statvfs->f_blocks = *ints++;
  statvfs->f_bfree = *ints++;
  statvfs->f_bavail = *ints++;
  statvfs->f_files = *ints++;
  statvfs->f_ffree = *ints++;
  statvfs->f_favail = *ints++;
  statvfs->f_fsid = *ints++;
  statvfs->f_flag = *ints++;
  statvfs->f_namemax = *ints++;
}

// Methods

FUSE_METHOD(statfs, 1, 1, (const char * path, struct statvfs *statvfs), {
  l->path = path;
  l->statvfs = statvfs;
}, {
  napi_create_string_utf8(env, l->path, NAPI_AUTO_LENGTH, &(argv[2]));
}, {
  NAPI_ARGV_BUFFER_CAST(uint32_t*, ints, 2)
  populate_statvfs(ints, l->statvfs);
})

FUSE_METHOD(getattr, 1, 1, (const char *path, struct stat *stat), {
  l->path = path;
  l->stat = stat;
}, {
  napi_create_string_utf8(env, l->path, NAPI_AUTO_LENGTH, &(argv[2]));
}, {
  NAPI_ARGV_BUFFER_CAST(uint32_t*, ints, 2)
  populate_stat(ints, l->stat);
})

FUSE_METHOD(fgetattr, 2, 1, (const char *path, struct stat *stat, struct fuse_file_info *info), {
  l->path = path;
  l->stat = stat;
  l->info = info;
}, {
  napi_create_string_utf8(env, l->path, NAPI_AUTO_LENGTH, &(argv[2]));
  if (l->info != NULL) {
    napi_create_uint32(env, l->info->fh, &(argv[3]));
  } else {
    napi_create_uint32(env, 0, &(argv[3]));
  }
}, {
  NAPI_ARGV_BUFFER_CAST(uint32_t*, ints, 2)
  populate_stat(ints, l->stat);
})

FUSE_METHOD_VOID(access, 2, 0, (const char *path, int mode), {
  l->path = path;
  l->mode = mode;
}, {
  napi_create_string_utf8(env, l->path, NAPI_AUTO_LENGTH, &(argv[2]));
  napi_create_uint32(env, l->mode, &(argv[3]));
})

FUSE_METHOD(open, 2, 1, (const char *path, struct fuse_file_info *info), {
  l->path = path;
  l->info = info;
}, {
  napi_create_string_utf8(env, l->path, NAPI_AUTO_LENGTH, &(argv[2]));
  if (l->info != NULL) {
    napi_create_uint32(env, l->info->flags, &(argv[3]));
  } else {
    napi_create_uint32(env, 0, &(argv[3]));
  }
}, {
  NAPI_ARGV_INT32(fd, 2)
  if (fd != 0) {
    l->info->fh = fd;
  }
})

FUSE_METHOD(opendir, 3, 1, (const char *path, struct fuse_file_info *info), {
  l->path = path;
  l->info = info;
}, {
  napi_create_string_utf8(env, l->path, NAPI_AUTO_LENGTH, &(argv[2]));
  if (l->info != NULL) {
    napi_create_uint32(env, l->info->fh, &(argv[3]));
    napi_create_uint32(env, l->info->flags, &(argv[4]));
  } else {
    napi_create_uint32(env, 0, &(argv[3]));
    napi_create_uint32(env, 0, &(argv[4]));
  }
}, {
  NAPI_ARGV_INT32(fd, 2)
  if (fd != 0) {
    l->info->fh = fd;
  }
})

FUSE_METHOD(create, 2, 1, (const char *path, mode_t mode, struct fuse_file_info *info), {
  l->path = path;
  l->mode = mode;
  l->info = info;
}, {
  napi_create_string_utf8(env, l->path, NAPI_AUTO_LENGTH, &(argv[2]));
  napi_create_uint32(env, l->mode, &(argv[3]));
}, {
  NAPI_ARGV_INT32(fd, 2)
  if (fd != 0) {
    l->info->fh = fd;
  }
})

FUSE_METHOD_VOID(utimens, 5, 0, (const char *path, const struct timespec tv[2]), {
  l->path = path;
  l->atime = timespec_to_uint64(&tv[0]);
  l->mtime = timespec_to_uint64(&tv[1]);
}, {
  napi_create_string_utf8(env, l->path, NAPI_AUTO_LENGTH, &(argv[2]));
  FUSE_UINT64_TO_INTS_ARGV(l->atime, 3)
  FUSE_UINT64_TO_INTS_ARGV(l->atime, 5)
})

FUSE_METHOD_VOID(release, 2, 0, (const char *path, struct fuse_file_info *info), {
  l->path = path;
  l->info = info;
}, {
  napi_create_string_utf8(env, l->path, NAPI_AUTO_LENGTH, &(argv[2]));
  if (l->info != NULL) {
    napi_create_uint32(env, l->info->fh, &(argv[3]));
  } else {
    napi_create_uint32(env, 0, &(argv[3]));
  }
})

FUSE_METHOD_VOID(releasedir, 2, 0, (const char *path, struct fuse_file_info *info), {
  l->path = path;
  l->info = info;
}, {
  napi_create_string_utf8(env, l->path, NAPI_AUTO_LENGTH, &(argv[2]));
  if (l->info != NULL) {
    napi_create_uint32(env, l->info->fh, &(argv[3]));
  } else {
    napi_create_uint32(env, 0, &(argv[3]));
  }
})

FUSE_METHOD(read, 6, 2, (const char *path, char *buf, size_t len, off_t offset, struct fuse_file_info *info), {
  l->path = path;
  l->buf = buf;
  l->len = len;
  l->offset = offset;
  l->info = info;
}, {
  napi_create_string_utf8(env, l->path, NAPI_AUTO_LENGTH, &(argv[2]));
  napi_create_uint32(env, l->info->fh, &(argv[3]));
  napi_create_external_buffer(env, l->len, (char *) l->buf, NULL, NULL, &(argv[4]));
  napi_create_uint32(env, l->len, &(argv[5]));
  FUSE_UINT64_TO_INTS_ARGV(l->offset, 6)
}, {
  if (IS_ARRAY_BUFFER_DETACH_SUPPORTED == 1) assert(napi_detach_arraybuffer(env, argv[3]) == napi_ok);
})

FUSE_METHOD(write, 6, 2, (const char *path, const char *buf, size_t len, off_t offset, struct fuse_file_info *info), {
  l->path = path;
  l->buf = buf;
  l->len = len;
  l->offset = offset;
  l->info = info;
}, {
  napi_create_string_utf8(env, l->path, NAPI_AUTO_LENGTH, &(argv[2]));
  napi_create_uint32(env, l->info->fh, &(argv[3]));
  napi_create_external_buffer(env, l->len, (char *) l->buf, NULL, NULL, &(argv[4]));
  napi_create_uint32(env, l->len, &(argv[5]));
  FUSE_UINT64_TO_INTS_ARGV(l->offset, 6)
}, {
  if (IS_ARRAY_BUFFER_DETACH_SUPPORTED == 1) assert(napi_detach_arraybuffer(env, argv[3]) == napi_ok);
})

FUSE_METHOD(readdir, 1, 2, (const char *path, void *buf, fuse_fill_dir_t filler, off_t offset, struct fuse_file_info *info), {
  l->buf = buf;
  l->path = path;
  l->offset = offset;
  l->info = info;
  l->readdir_filler = filler;
}, {
  napi_create_string_utf8(env, l->path, NAPI_AUTO_LENGTH, &(argv[2]));
}, {
  uint32_t stats_length;
  uint32_t names_length;
  napi_get_array_length(env, argv[3], &stats_length);
  napi_get_array_length(env, argv[2], &names_length);

  napi_value raw_names = argv[2];
  napi_value raw_stats = argv[3];

  if (names_length != stats_length) {
    NAPI_FOR_EACH(raw_names, raw_name) {
      NAPI_UTF8(name, 1024, raw_name)
      int err = l->readdir_filler((char *) l->buf, name, NULL, 0);
      if (err == 1) {
        break;
      }
    }
  } else {
    NAPI_FOR_EACH(raw_names, raw_name) {
      NAPI_UTF8(name, 1024, raw_name)
      napi_value raw_stat;
      napi_get_element(env, raw_stats, i, &raw_stat);

      NAPI_BUFFER_CAST(uint32_t*, stats_array, raw_stat);
      struct stat st;
      populate_stat(stats_array, &st);

      // TODO: It turns out readdirplus likely won't work with FUSE 29...
      // Metadata caching between readdir/getattr will be enabled when we upgrade fuse-shared-library
      int err = l->readdir_filler((char *) l->buf, name, (struct stat *) &st, 0);
      if (err == 1) {
        break;
      }
    }
  }
})

#ifdef __APPLE__

FUSE_METHOD(setxattr, 5, 1, (const char *path, const char *name, const char *value, size_t size, int flags, uint32_t position), {
  l->path = path;
  l->name = name;
  l->value = value;
  l->size = size;
  l->flags = flags;
  l->position = position;
}, {
  napi_create_string_utf8(env, l->path, NAPI_AUTO_LENGTH, &(argv[2]));
  napi_create_string_utf8(env, l->name, NAPI_AUTO_LENGTH, &(argv[3]));
  napi_create_external_buffer(env, l->size, (char *) l->value, NULL, NULL, &(argv[4]));
  napi_create_uint32(env, l->position, &(argv[5]));
  napi_create_uint32(env, l->flags, &(argv[6]));
}, {
  if (IS_ARRAY_BUFFER_DETACH_SUPPORTED == 1) assert(napi_detach_arraybuffer(env, argv[2]) == napi_ok);
})

FUSE_METHOD(getxattr, 4, 1, (const char *path, const char *name, char *value, size_t size, uint32_t position), {
  l->path = path;
  l->name = name;
  l->value = value;
  l->size = size;
  l->position = position;
}, {
  napi_create_string_utf8(env, l->path, NAPI_AUTO_LENGTH, &(argv[2]));
  napi_create_string_utf8(env, l->name, NAPI_AUTO_LENGTH, &(argv[3]));
  napi_create_external_buffer(env, l->size, (char *) l->value, NULL, NULL, &(argv[4]));
  napi_create_uint32(env, l->position, &(argv[5]));
}, {
  if (IS_ARRAY_BUFFER_DETACH_SUPPORTED == 1) assert(napi_detach_arraybuffer(env, argv[2]) == napi_ok);
})

#else

FUSE_METHOD(setxattr, 5, 1, (const char *path, const char *name, const char *value, size_t size, int flags), {
  l->path = path;
  l->name = name;
  l->value = value;
  l->size = size;
  l->flags = flags;
}, {
  napi_create_string_utf8(env, l->path, NAPI_AUTO_LENGTH, &(argv[2]));
  napi_create_string_utf8(env, l->name, NAPI_AUTO_LENGTH, &(argv[3]));
  napi_create_external_buffer(env, l->size, (char *) l->value, NULL, NULL, &(argv[4]));
  napi_create_uint32(env, 0, &(argv[5])); // normalize apis between mac and linux
  napi_create_uint32(env, l->flags, &(argv[6]));
}, {
  if (IS_ARRAY_BUFFER_DETACH_SUPPORTED == 1) assert(napi_detach_arraybuffer(env, argv[2]) == napi_ok);
})

FUSE_METHOD(getxattr, 4, 1, (const char *path, const char *name, char *value, size_t size), {
  l->path = path;
  l->name = name;
  l->value = value;
  l->size = size;
}, {
  napi_create_string_utf8(env, l->path, NAPI_AUTO_LENGTH, &(argv[2]));
  napi_create_string_utf8(env, l->name, NAPI_AUTO_LENGTH, &(argv[3]));
  napi_create_external_buffer(env, l->size, (char *) l->value, NULL, NULL, &(argv[4]));
  napi_create_uint32(env, 0, &(argv[5]));
}, {
  if (IS_ARRAY_BUFFER_DETACH_SUPPORTED == 1) assert(napi_detach_arraybuffer(env, argv[2]) == napi_ok);
})

#endif

FUSE_METHOD(listxattr, 2, 1, (const char *path, char *list, size_t size), {
  l->path = path;
  l->list = list;
  l->size = size;
}, {
  napi_create_string_utf8(env, l->path, NAPI_AUTO_LENGTH, &(argv[2]));
  napi_create_external_buffer(env, l->size, l->list, NULL, NULL, &(argv[3]));
}, {
  if (IS_ARRAY_BUFFER_DETACH_SUPPORTED == 1) assert(napi_detach_arraybuffer(env, argv[2]) == napi_ok);
})

FUSE_METHOD_VOID(removexattr, 2, 0, (const char *path, const char *name), {
  l->path = path;
  l->name = name;
}, {
  napi_create_string_utf8(env, l->path, NAPI_AUTO_LENGTH, &(argv[2]));
  napi_create_string_utf8(env, l->name, NAPI_AUTO_LENGTH, &(argv[3]));
})

FUSE_METHOD_VOID(flush, 2, 0, (const char *path, struct fuse_file_info *info), {
  l->path = path;
  l->info = info;
}, {
  napi_create_string_utf8(env, l->path, NAPI_AUTO_LENGTH, &(argv[2]));
  if (l->info != NULL) {
    napi_create_uint32(env, l->info->fh, &(argv[3]));
  } else {
    napi_create_uint32(env, 0, &(argv[3]));
  }
})

FUSE_METHOD_VOID(fsync, 3, 0, (const char *path, int datasync, struct fuse_file_info *info), {
  l->path = path;
  l->mode = datasync;
  l->info = info;
}, {
  napi_create_string_utf8(env, l->path, NAPI_AUTO_LENGTH, &(argv[2]));
  napi_create_uint32(env, l->mode, &(argv[3]));
  if (l->info != NULL) {
    napi_create_uint32(env, l->info->fh, &(argv[4]));
  } else {
    napi_create_uint32(env, 0, &(argv[4]));
  }
})

FUSE_METHOD_VOID(fsyncdir, 3, 0, (const char *path, int datasync, struct fuse_file_info *info), {
  l->path = path;
  l->mode = datasync;
  l->info = info;
}, {
  napi_create_string_utf8(env, l->path, NAPI_AUTO_LENGTH, &(argv[2]));
  napi_create_uint32(env, l->mode, &(argv[3]));
  if (l->info != NULL) {
    napi_create_uint32(env, l->info->fh, &(argv[4]));
  } else {
    napi_create_uint32(env, 0, &(argv[4]));
  }
})


FUSE_METHOD_VOID(truncate, 3, 0, (const char *path, off_t size), {
  l->path = path;
  l->offset = size;
}, {
  napi_create_string_utf8(env, l->path, NAPI_AUTO_LENGTH, &(argv[2]));
  FUSE_UINT64_TO_INTS_ARGV(l->offset, 3)
})

FUSE_METHOD_VOID(ftruncate, 4, 0, (const char *path, off_t size, struct fuse_file_info *info), {
  l->path = path;
  l->offset = size;
  l->info = info;
}, {
  napi_create_string_utf8(env, l->path, NAPI_AUTO_LENGTH, &(argv[2]));
  if (l->info != NULL) {
    napi_create_uint32(env, l->info->fh, &(argv[3]));
  } else {
    napi_create_uint32(env, 0, &(argv[3]));
  }
  FUSE_UINT64_TO_INTS_ARGV(l->offset, 4)
})

// qcow2fs: fallocate(path, fh, mode, offsetLow, offsetHigh, lengthLow, lengthHigh)
FUSE_METHOD_VOID(fallocate, 7, 0, (const char *path, int mode, off_t offset, off_t len, struct fuse_file_info *info), {
  l->path = path;
  l->flags = mode;
  l->offset = offset;
  l->len = (size_t) len;
  l->info = info;
}, {
  napi_create_string_utf8(env, l->path, NAPI_AUTO_LENGTH, &(argv[2]));
  napi_create_uint32(env, l->info != NULL ? l->info->fh : 0, &(argv[3]));
  napi_create_int32(env, l->flags, &(argv[4]));
  FUSE_UINT64_TO_INTS_ARGV(l->offset, 5)
  FUSE_UINT64_TO_INTS_ARGV(l->len, 7)
})

FUSE_METHOD(readlink, 1, 1, (const char *path, char *linkname, size_t len), {
  l->path = path;
  l->linkname = linkname;
  l->len = len;
}, {
  napi_create_string_utf8(env, l->path, NAPI_AUTO_LENGTH, &(argv[2]));
}, {
  NAPI_ARGV_UTF8(linkname, l->len, 2)
  strncpy(l->linkname, linkname, l->len);
})

FUSE_METHOD_VOID(chown, 3, 0, (const char *path, uid_t uid, gid_t gid), {
  l->path = path;
  l->uid = uid;
  l->gid = gid;
}, {
  napi_create_string_utf8(env, l->path, NAPI_AUTO_LENGTH, &(argv[2]));
  napi_create_uint32(env, l->uid, &(argv[3]));
  napi_create_uint32(env, l->gid, &(argv[4]));
})

FUSE_METHOD_VOID(chmod, 2, 0, (const char *path, mode_t mode), {
  l->path = path;
  l->mode = mode;
}, {
  napi_create_string_utf8(env, l->path, NAPI_AUTO_LENGTH, &(argv[2]));
  napi_create_uint32(env, l->mode, &(argv[3]));
})

FUSE_METHOD_VOID(mknod, 3, 0, (const char *path, mode_t mode, dev_t dev), {
  l->path = path;
  l->mode = mode;
  l->dev = dev;
}, {
  napi_create_string_utf8(env, l->path, NAPI_AUTO_LENGTH, &(argv[2]));
  napi_create_uint32(env, l->mode, &(argv[3]));
  napi_create_uint32(env, l->dev, &(argv[4]));
})

FUSE_METHOD_VOID(unlink, 1, 0, (const char *path), {
  l->path = path;
}, {
  napi_create_string_utf8(env, l->path, NAPI_AUTO_LENGTH, &(argv[2]));
})

FUSE_METHOD_VOID(rename, 2, 0, (const char *path, const char *dest), {
  l->path = path;
  l->dest = dest;
}, {
  napi_create_string_utf8(env, l->path, NAPI_AUTO_LENGTH, &(argv[2]));
  napi_create_string_utf8(env, l->dest, NAPI_AUTO_LENGTH, &(argv[3]));
})

FUSE_METHOD_VOID(link, 2, 0, (const char *path, const char *dest), {
  l->path = path;
  l->dest = dest;
}, {
  napi_create_string_utf8(env, l->path, NAPI_AUTO_LENGTH, &(argv[2]));
  napi_create_string_utf8(env, l->dest, NAPI_AUTO_LENGTH, &(argv[3]));
})

FUSE_METHOD_VOID(symlink, 2, 0, (const char *path, const char *dest), {
  l->path = path;
  l->dest = dest;
}, {
  napi_create_string_utf8(env, l->path, NAPI_AUTO_LENGTH, &(argv[2]));
  napi_create_string_utf8(env, l->dest, NAPI_AUTO_LENGTH, &(argv[3]));
})

FUSE_METHOD_VOID(mkdir, 2, 0, (const char *path, mode_t mode), {
  l->path = path;
  l->mode = mode;
}, {
  napi_create_string_utf8(env, l->path, NAPI_AUTO_LENGTH, &(argv[2]));
  napi_create_uint32(env, l->mode, &(argv[3]));
})

FUSE_METHOD_VOID(rmdir, 1, 0, (const char *path), {
  l->path = path;
}, {
  napi_create_string_utf8(env, l->path, NAPI_AUTO_LENGTH, &(argv[2]));
})

static void fuse_native_dispatch_init (uv_async_t* handle, fuse_thread_locals_t* l, fuse_thread_t* ft) {\
  FUSE_NATIVE_CALLBACK(ft->handlers[op_init], {
    napi_value argv[2];

    napi_get_reference_value(env, l->self, &(argv[0]));
    napi_create_uint32(env, l->op, &(argv[1]));

    NAPI_MAKE_CALLBACK(env, NULL, ctx, callback, 2, argv, NULL);
  })
}

NAPI_METHOD(fuse_native_signal_init) {
  NAPI_ARGV(2)
  NAPI_ARGV_BUFFER_CAST(fuse_thread_locals_t *, l, 0);
  NAPI_ARGV_INT32(res, 1);
  l->res = res;
  uv_sem_post(&(l->sem));
  return NULL;
}

static void * fuse_native_init (struct fuse_conn_info *conn) {
  fuse_thread_locals_t *l = get_thread_locals();

  l->op = op_init;
  l->op_fn = fuse_native_dispatch_init;

  uv_async_send(&(l->async));
  uv_sem_wait(&(l->sem));

  return l->fuse;
}

// Top-level dispatcher

static void fuse_native_dispatch (uv_async_t* handle) {
  fuse_thread_locals_t *l = (fuse_thread_locals_t *) handle->data;
  fuse_thread_t *ft = l->fuse;
  void (*fn)(uv_async_t *, fuse_thread_locals_t *, fuse_thread_t *) = l->op_fn;

  fn(handle, l, ft);
}

static void fuse_native_async_init (uv_async_t* handle) {
  fuse_thread_t *ft = (fuse_thread_t *) handle->data;
  fuse_thread_locals_t *l;

  FUSE_NATIVE_CALLBACK(ft->malloc, {
    napi_value argv[1];
    napi_create_uint32(ft->env, (uint32_t) sizeof(fuse_thread_locals_t), &(argv[0]));

    napi_value buf;
    NAPI_MAKE_CALLBACK(ft->env, NULL, ctx, callback, 1, argv, &buf);

    size_t l_len;

    napi_get_buffer_info(env, buf, (void **) &l, &l_len);
    napi_create_reference(env, buf, 1, &(l->self));
  })


  int err = uv_async_init(uv_default_loop(), &(l->async), (uv_async_cb) fuse_native_dispatch);
  assert(err >= 0);

  uv_unref((uv_handle_t *) &(l->async));

  uv_sem_init(&(l->sem), 0);
  l->async.data = l;
  ft->async.data = l;
  l->fuse = ft;

  uv_sem_post(&(ft->sem));
}

static fuse_thread_locals_t* get_thread_locals () {
  struct fuse_context *ctx = fuse_get_context();
  fuse_thread_t *ft = (fuse_thread_t *) ctx->private_data;

  void *data = pthread_getspecific(thread_locals_key);

  if (data != NULL) {
    return (fuse_thread_locals_t *) data;
  }

  fuse_thread_locals_t *reused = reuse_thread_locals(ft);
  if (reused != NULL) {
    pthread_setspecific(thread_locals_key, (void *) reused);
    return reused;
  }

  // Need to lock the mutation of l->async.
  uv_mutex_lock(&(ft->mut));
  ft->async.data = ft;

  // Notify the main thread to uv_async_init l->async.
  uv_async_send(&(ft->async));
  uv_sem_wait(&(ft->sem));

  fuse_thread_locals_t *l = (fuse_thread_locals_t*) ft->async.data;

  pthread_setspecific(thread_locals_key, (void *) l);
  uv_mutex_unlock(&(ft->mut));

  return l;
}

static void* start_fuse_thread (void *data) {
  fuse_thread_t *ft = (fuse_thread_t *) data;
  fuse_loop_mt(ft->fuse);

  fuse_unmount(ft->mnt, ft->ch);
  fuse_session_remove_chan(ft->ch);
  fuse_destroy(ft->fuse);

  return NULL;
}


/*
 * qcow2fs: a /dev/fuse channel that amends libfuse's answer to the kernel's INIT.
 *
 * libfuse 2.9 speaks FUSE protocol 7.19 and answers INIT with only the capabilities it knows.
 * Two that the kernel offers matter for reads and writes with O_DIRECT:
 *  - FUSE_ASYNC_DIO (7.22): without it the kernel handles an O_DIRECT request synchronously,
 *    one FUSE request at a time per caller, even under io_submit with a queue depth of 16; a
 *    large O_DIRECT request is also sent as one 128 KiB piece after the other.
 *  - FUSE_MAX_PAGES (7.28): without it a request carries at most 32 pages (128 KiB).
 * Both only change how the kernel queues and sizes requests; the requests themselves are the
 * READ/WRITE messages libfuse 2.9 already handles (concurrently, with its multithreaded loop).
 * The kernel accepts an INIT answer of any length up to its own struct, so adding max_pages
 * (which lies after the 7.19 fields) is sent as a longer answer.
 *
 * The channel does what libfuse's own kernel channel does (read and writev on the /dev/fuse
 * descriptor, same error handling), notes the INIT request, and edits the answer to it.
 */
#define QCOW2FS_FUSE_ASYNC_DIO (1u << 15)
#define QCOW2FS_FUSE_MAX_PAGES (1u << 22)

// The kernel's struct fuse_init_out up to max_pages (protocol 7.28); the 7.19 part is libfuse's.
struct qcow2fs_init_out {
  uint32_t major;
  uint32_t minor;
  uint32_t max_readahead;
  uint32_t flags;
  uint16_t max_background;
  uint16_t congestion_threshold;
  uint32_t max_write;
  uint32_t time_gran;
  uint16_t max_pages;
  uint16_t map_alignment;
};

static int qcow2fs_chan_receive (struct fuse_chan **chp, char *buf, size_t size) {
  struct fuse_chan *ch = *chp;
  struct fuse_session *se = fuse_chan_session(ch);
  fuse_thread_t *ft = (fuse_thread_t *) fuse_chan_data(ch);
  ssize_t res;
  int err;

restart:
  res = read(fuse_chan_fd(ch), buf, size);
  err = errno;
  if (fuse_session_exited(se)) return 0;
  if (res == -1) {
    // ENOENT: the request was interrupted, it is safe to read the next one.
    if (err == ENOENT) goto restart;
    if (err == ENODEV) {
      // Unmounted.
      fuse_session_exit(se);
      return 0;
    }
    if (err != EINTR && err != EAGAIN) perror("fuse: reading device");
    return -err;
  }
  if ((size_t) res < sizeof(struct fuse_in_header)) {
    fprintf(stderr, "short read on fuse device\n");
    return -EIO;
  }
  struct fuse_in_header *in = (struct fuse_in_header *) buf;
  if (in->opcode == FUSE_INIT && (size_t) res >= sizeof(*in) + sizeof(struct fuse_init_in)) {
    struct fuse_init_in *arg = (struct fuse_init_in *) (buf + sizeof(*in));
    ft->init_unique = in->unique;
    ft->kernel_flags = arg->major == 7 && arg->minor >= 6 ? arg->flags : 0;
  }
  return res;
}

static int qcow2fs_chan_send (struct fuse_chan *ch, const struct iovec iov[], size_t count) {
  if (iov == NULL) return 0;
  fuse_thread_t *ft = (fuse_thread_t *) fuse_chan_data(ch);
  struct fuse_out_header hdr;
  struct qcow2fs_init_out init;
  struct iovec patched[2];

  if (ft->init_unique != 0 && count == 2 && iov[0].iov_len == sizeof(hdr) &&
      ((struct fuse_out_header *) iov[0].iov_base)->unique == ft->init_unique &&
      ((struct fuse_out_header *) iov[0].iov_base)->error == 0 && iov[1].iov_len <= sizeof(init) &&
      iov[1].iov_len >= offsetof(struct qcow2fs_init_out, time_gran)) {
    ft->init_unique = 0;
    memcpy(&hdr, iov[0].iov_base, sizeof(hdr));
    memset(&init, 0, sizeof(init));
    memcpy(&init, iov[1].iov_base, iov[1].iov_len);
    size_t len = iov[1].iov_len;
    if (ft->want_async_dio && (ft->kernel_flags & QCOW2FS_FUSE_ASYNC_DIO)) init.flags |= QCOW2FS_FUSE_ASYNC_DIO;
    if (ft->max_pages > 32 && (ft->kernel_flags & QCOW2FS_FUSE_MAX_PAGES)) {
      init.flags |= QCOW2FS_FUSE_MAX_PAGES;
      init.max_pages = (uint16_t) ft->max_pages;
      len = sizeof(init);
    }
    ft->init_flags_sent = init.flags;
    hdr.len = sizeof(hdr) + len;
    patched[0].iov_base = &hdr;
    patched[0].iov_len = sizeof(hdr);
    patched[1].iov_base = &init;
    patched[1].iov_len = len;
    iov = patched;
  }

  ssize_t res = writev(fuse_chan_fd(ch), iov, count);
  int err = errno;
  if (res == -1) {
    // ENOENT: the request was interrupted and the answer dropped.
    if (!fuse_session_exited(fuse_chan_session(ch)) && err != ENOENT) perror("fuse: writing device");
    return -err;
  }
  return 0;
}

static void qcow2fs_chan_destroy (struct fuse_chan *ch) {
  int fd = fuse_chan_fd(ch);
  if (fd != -1) close(fd);
}

static struct fuse_chan_ops qcow2fs_chan_ops = {
  .receive = qcow2fs_chan_receive,
  .send = qcow2fs_chan_send,
  .destroy = qcow2fs_chan_destroy,
};

// INIT flags sent to the kernel (after the qcow2fs amendments), 0 before INIT was answered.

/*
 * qcow2fs: reads answered on libfuse's worker thread, without waking the JS thread.
 *
 * Every FUSE request otherwise costs four thread wake-ups (kernel -> worker -> JS thread ->
 * worker -> kernel). For a read whose guest clusters all have a valid slot in the file's direct
 * read map, the worker does the preads itself (host-contiguous clusters merged into one) and
 * answers: two wake-ups, as in QEMU's own FUSE export. Anything else (a slot missing or being
 * changed, compressed clusters, a range past the file's size, an I/O error) goes to JS as before,
 * so the JS engine stays the one that decides: the map only caches its answers.
 *
 * Freed host clusters: JS invalidates a slot before the mapping changes, and before a host
 * cluster can be reused it calls quiesce, which waits until no fast read that may have seen the
 * old slot is still running (readers count, blocked flag: a reader counts itself, then checks
 * blocked; JS sets blocked, then waits for the count to drop to zero).
 */
static int qcow2fs_slot_get (qcow2fs_fastmap_t *m, uint64_t cluster, int32_t *fd, uint64_t *host) {
  qcow2fs_slot_t *s = &m->slots[cluster & m->slot_mask];
  uint32_t s1 = __atomic_load_n(&s->seq, __ATOMIC_ACQUIRE);
  if (s1 & 1) return 0;
  uint64_t key = __atomic_load_n(&s->key, __ATOMIC_RELAXED);
  int32_t f = __atomic_load_n(&s->fd, __ATOMIC_RELAXED);
  uint64_t h = __atomic_load_n(&s->host, __ATOMIC_RELAXED);
  __atomic_thread_fence(__ATOMIC_ACQUIRE);
  uint32_t s2 = __atomic_load_n(&s->seq, __ATOMIC_RELAXED);
  if (s1 != s2 || key != cluster + 1) return 0;
  *fd = f;
  *host = h;
  return 1;
}

static void qcow2fs_slot_set (qcow2fs_fastmap_t *m, uint64_t cluster, int32_t fd, uint64_t host, int valid) {
  qcow2fs_slot_t *s = &m->slots[cluster & m->slot_mask];
  uint32_t seq = __atomic_load_n(&s->seq, __ATOMIC_RELAXED);
  if (!valid) {
    // Only clear a slot that holds this cluster: another cluster's entry stays.
    if (__atomic_load_n(&s->key, __ATOMIC_RELAXED) != cluster + 1) return;
  }
  __atomic_store_n(&s->seq, seq + 1, __ATOMIC_RELAXED);
  __atomic_thread_fence(__ATOMIC_RELEASE);
  __atomic_store_n(&s->key, valid ? cluster + 1 : 0, __ATOMIC_RELAXED);
  __atomic_store_n(&s->fd, fd, __ATOMIC_RELAXED);
  __atomic_store_n(&s->host, host, __ATOMIC_RELAXED);
  __atomic_store_n(&s->seq, seq + 2, __ATOMIC_RELEASE);
}

// Reads len bytes at host of fd into dst (fd -1: zeros); bytes past the end of the file read as
// zeros, as the JS engine reads them. 0 on an error (the request then goes to JS).
static int qcow2fs_run_read (int32_t fd, char *dst, size_t len, uint64_t host) {
  if (len == 0) return 1;
  if (fd < 0) {
    memset(dst, 0, len);
    return 1;
  }
  size_t done = 0;
  while (done < len) {
    ssize_t n = pread(fd, dst + done, len - done, (off_t) (host + done));
    if (n < 0) {
      if (errno == EINTR) continue;
      return 0;
    }
    if (n == 0) {
      memset(dst + done, 0, len - done);
      return 1;
    }
    done += (size_t) n;
  }
  return 1;
}

/*
 * Compressed clusters decoded on the worker threads. A slot may say "compressed bytes at (fd,
 * offset, length)"; the worker reads and decodes them with the codec addon's decoder into the
 * map's cache of decoded clusters, then copies the requested bytes out. Each cluster is decoded
 * once however many requests want it (a request finding it being decoded waits for it; one
 * finding it only queued decodes it itself). Sequential reads queue the clusters of the next
 * QCOW2FS_Z_WINDOW bytes for helper threads (one per core), so the cores decode in parallel
 * while the kernel sends its read-ahead requests one or two at a time.
 *
 * Helpers count as readers of the map (quiesce and disable wait for them). The host bytes of a
 * compressed cluster change only after the engine frees them, which it does only after quiesce:
 * quiesce empties the cache and starts a new generation, and queued jobs of an older one are
 * dropped. A request whose cache set is all in use waits until an entry is let go (the cache
 * bounds the memory decoding takes, however many workers libfuse starts); a failure
 * (no decoder, a corrupt cluster) sends the request to JS, which reports it or reads it itself.
 */
typedef struct {
  qcow2fs_fastmap_t *m;
  uint32_t idx;
  int32_t fdw;
  uint64_t hw;
  uint64_t gen;
} qcow2fs_zjob_t;

#define QCOW2FS_ZQ_CAP 1024u

static pthread_mutex_t qcow2fs_zq_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t qcow2fs_zq_cond = PTHREAD_COND_INITIALIZER;
static qcow2fs_zjob_t qcow2fs_zq[QCOW2FS_ZQ_CAP];
static uint32_t qcow2fs_zq_head, qcow2fs_zq_len;
static pthread_once_t qcow2fs_zq_once = PTHREAD_ONCE_INIT;

static int qcow2fs_z_decode (qcow2fs_fastmap_t *m, int32_t fdw, uint64_t hw, uint8_t *dst) {
  const qcow2fs_codec_api_t *api = __atomic_load_n(&qcow2fs_codec, __ATOMIC_ACQUIRE);
  if (api == NULL) return 0;
  uint64_t cs = 1ull << m->cluster_bits;
  uint64_t off = hw & ((1ull << QCOW2FS_CHOST_BITS) - 1);
  uint64_t bytes = (hw >> QCOW2FS_CHOST_BITS) * 512 - (off & 511);
  int64_t r = api->decode_file((fdw & QCOW2FS_SLOT_ZSTD) ? 1 : 0, fdw & QCOW2FS_SLOT_CFD_MASK, (int64_t) off, (size_t) bytes, dst, cs);
  if (r != (int64_t) cs) return 0;
  __atomic_add_fetch(&m->z_decoded, 1, __ATOMIC_RELAXED);
  return 1;
}

static uint32_t qcow2fs_z_set (qcow2fs_fastmap_t *m, uint64_t hw) {
  uint64_t h = (hw & ((1ull << QCOW2FS_CHOST_BITS) - 1)) >> 9;
  h *= 0x9e3779b97f4a7c15ull;
  return (uint32_t) (h >> 32) % m->zsets;
}

// Under zlock: the entry holding (fdw, hw), or NULL.
static qcow2fs_zent_t *qcow2fs_z_find (qcow2fs_fastmap_t *m, int32_t fdw, uint64_t hw) {
  qcow2fs_zent_t *set = m->zents + (size_t) qcow2fs_z_set(m, hw) * m->zways;
  for (uint32_t i = 0; i < m->zways; i++) {
    if (set[i].state != QCOW2FS_Z_FREE && set[i].hw == hw && set[i].fdw == fdw) return &set[i];
  }
  return NULL;
}

// The decoded-cluster cache's shape: QCOW2FS_Z_CACHE_BYTES, at least two read-ahead windows plus
// four clusters, at most QCOW2FS_Z_MAX_ENTRIES; the window (QCOW2FS_Z_WINDOW, at least two
// clusters) at most half of it (tiny clusters: a 1 MiB window would evict itself).
static void qcow2fs_z_size (qcow2fs_fastmap_t *m) {
  uint64_t cs = 1ull << m->cluster_bits;
  uint64_t window = QCOW2FS_Z_WINDOW > 2 * cs ? QCOW2FS_Z_WINDOW : 2 * cs;
  uint64_t n = QCOW2FS_Z_CACHE_BYTES / cs;
  if (n < 2 * (window / cs) + 4) n = 2 * (window / cs) + 4;
  if (n > QCOW2FS_Z_MAX_ENTRIES) n = QCOW2FS_Z_MAX_ENTRIES;
  m->zways = n < QCOW2FS_Z_WAYS ? (uint32_t) n : QCOW2FS_Z_WAYS;
  m->zsets = (uint32_t) (n / m->zways);
  uint64_t half = (uint64_t) (m->zsets * m->zways / 2) * cs;
  m->zwindow = window < half ? window : half;
}

// Under zlock: an entry of hw's set for a new cluster (free, or the least recently used ready
// one nobody holds), with its buffer; NULL if there is none (*nomem set when memory ran out).
static qcow2fs_zent_t *qcow2fs_z_claim (qcow2fs_fastmap_t *m, int32_t fdw, uint64_t hw, uint32_t state, int *nomem) {
  *nomem = 0;
  if (m->zents == NULL) {
    m->zents = calloc((size_t) m->zsets * m->zways, sizeof(qcow2fs_zent_t));
    if (m->zents == NULL) {
      *nomem = 1;
      return NULL;
    }
  }
  qcow2fs_zent_t *set = m->zents + (size_t) qcow2fs_z_set(m, hw) * m->zways;
  qcow2fs_zent_t *v = NULL;
  for (uint32_t i = 0; i < m->zways; i++) {
    qcow2fs_zent_t *e = &set[i];
    if (e->pins != 0) continue;
    if (e->state == QCOW2FS_Z_FREE) {
      v = e;
      break;
    }
    if (e->state == QCOW2FS_Z_READY && (v == NULL || e->used < v->used)) v = e;
  }
  if (v == NULL) return NULL;
  if (v->buf == NULL) {
    v->buf = malloc((size_t) 1 << m->cluster_bits);
    if (v->buf == NULL) {
      *nomem = 1;
      return NULL;
    }
  }
  v->fdw = fdw;
  v->hw = hw;
  v->state = state;
  v->gen = m->zgen;
  v->used = ++m->ztick;
  return v;
}

// Under zlock, held by the caller (pinned) in state LOADING: decodes it (unlocking meanwhile).
// Returns with zlock held, the entry READY (1) or FREE (0), and the waiters woken.
static int qcow2fs_z_load_locked (qcow2fs_fastmap_t *m, qcow2fs_zent_t *e) {
  int32_t fdw = e->fdw;
  uint64_t hw = e->hw;
  pthread_mutex_unlock(&m->zlock);
  int ok = qcow2fs_z_decode(m, fdw, hw, e->buf);
  pthread_mutex_lock(&m->zlock);
  if (ok) {
    e->state = QCOW2FS_Z_READY;
    e->used = ++m->ztick;
  } else {
    e->state = QCOW2FS_Z_FREE;
    e->hw = 0;
    e->fdw = 0;
  }
  pthread_cond_broadcast(&m->zcond);
  return ok;
}

// Under zlock: lets go of a pinned entry; the last pin wakes requests waiting for room.
static void qcow2fs_z_unpin (qcow2fs_fastmap_t *m, qcow2fs_zent_t *e) {
  e->pins--;
  if (e->pins == 0 && m->zwaiting > 0) pthread_cond_broadcast(&m->zcond);
}

static void *qcow2fs_z_helper (void *arg) {
  (void) arg;
  for (;;) {
    pthread_mutex_lock(&qcow2fs_zq_lock);
    while (qcow2fs_zq_len == 0) pthread_cond_wait(&qcow2fs_zq_cond, &qcow2fs_zq_lock);
    qcow2fs_zjob_t job = qcow2fs_zq[qcow2fs_zq_head];
    qcow2fs_zq_head = (qcow2fs_zq_head + 1) % QCOW2FS_ZQ_CAP;
    qcow2fs_zq_len--;
    pthread_mutex_unlock(&qcow2fs_zq_lock);
    qcow2fs_fastmap_t *m = job.m;
    // A reader of the map, like a fast read (see quiesce and disable).
    __atomic_add_fetch(&m->readers, 1, __ATOMIC_SEQ_CST);
    int usable = !__atomic_load_n(&m->blocked, __ATOMIC_SEQ_CST) && !__atomic_load_n(&m->disabled, __ATOMIC_SEQ_CST);
    pthread_mutex_lock(&m->zlock);
    qcow2fs_zent_t *e = &m->zents[job.idx];
    if (e->state == QCOW2FS_Z_QUEUED && e->fdw == job.fdw && e->hw == job.hw && e->gen == job.gen) {
      if (usable) {
        e->state = QCOW2FS_Z_LOADING;
        e->pins++;
        if (qcow2fs_z_load_locked(m, e)) __atomic_add_fetch(&m->z_ahead, 1, __ATOMIC_RELAXED);
        qcow2fs_z_unpin(m, e);
      } else {
        e->state = QCOW2FS_Z_FREE;
        if (m->zwaiting > 0) pthread_cond_broadcast(&m->zcond);
      }
    }
    pthread_mutex_unlock(&m->zlock);
    __atomic_sub_fetch(&m->readers, 1, __ATOMIC_SEQ_CST);
  }
  return NULL;
}

static void qcow2fs_z_start_helpers (void) {
  long cores = sysconf(_SC_NPROCESSORS_ONLN);
  if (cores < 1) cores = 1;
  if (cores > 4) cores = 4;
  for (long i = 0; i < cores; i++) {
    pthread_t t;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_create(&t, &attr, qcow2fs_z_helper, NULL);
    pthread_attr_destroy(&attr);
  }
}

// A read of [pos, end) over compressed clusters: if it continues the previous ones, queue the
// compressed clusters of the window after it that are not decoded yet.
static void qcow2fs_z_readahead (qcow2fs_fastmap_t *m, uint64_t pos, uint64_t end) {
  uint32_t cb = m->cluster_bits;
  uint64_t cs = 1ull << cb;
  uint64_t window = m->zwindow;
  uint64_t size = __atomic_load_n(&m->size, __ATOMIC_ACQUIRE);
  uint32_t queued = 0;
  pthread_mutex_lock(&m->zlock);
  uint64_t last = m->z_last_end;
  int sequential = last != 0 && pos + window >= last && pos <= last + cs;
  if (end > last || !sequential) m->z_last_end = end;
  if (!sequential || m->zents == NULL) {
    if (!sequential) m->z_ra_next = end;
    pthread_mutex_unlock(&m->zlock);
    return;
  }
  if (m->z_ra_next < m->z_last_end) m->z_ra_next = m->z_last_end;
  uint64_t limit = m->z_last_end + window;
  if (limit > size) limit = size;
  while (m->z_ra_next < limit) {
    uint64_t c = m->z_ra_next >> cb;
    int32_t fd;
    uint64_t host;
    if (!qcow2fs_slot_get(m, c, &fd, &host)) break; // not published yet: later
    m->z_ra_next = (c + 1) << cb;
    if (fd < 0 || !(fd & QCOW2FS_SLOT_COMPRESSED) || qcow2fs_z_find(m, fd, host) != NULL) continue;
    int nomem;
    qcow2fs_zent_t *e = qcow2fs_z_claim(m, fd, host, QCOW2FS_Z_QUEUED, &nomem);
    if (e == NULL) {
      m->z_ra_next = c << cb;
      break;
    }
    pthread_mutex_lock(&qcow2fs_zq_lock);
    if (qcow2fs_zq_len == QCOW2FS_ZQ_CAP) {
      pthread_mutex_unlock(&qcow2fs_zq_lock);
      e->state = QCOW2FS_Z_FREE;
      m->z_ra_next = c << cb;
      break;
    }
    qcow2fs_zjob_t *j = &qcow2fs_zq[(qcow2fs_zq_head + qcow2fs_zq_len) % QCOW2FS_ZQ_CAP];
    j->m = m;
    j->idx = (uint32_t) (e - m->zents);
    j->fdw = fd;
    j->hw = host;
    j->gen = e->gen;
    qcow2fs_zq_len++;
    pthread_mutex_unlock(&qcow2fs_zq_lock);
    queued++;
  }
  pthread_mutex_unlock(&m->zlock);
  if (queued > 0) {
    pthread_once(&qcow2fs_zq_once, qcow2fs_z_start_helpers);
    pthread_mutex_lock(&qcow2fs_zq_lock);
    if (queued > 1) pthread_cond_broadcast(&qcow2fs_zq_cond);
    else pthread_cond_signal(&qcow2fs_zq_cond);
    pthread_mutex_unlock(&qcow2fs_zq_lock);
  }
}

// Copies n bytes from offset `in` of the decoded compressed cluster (fdw, hw) into dst; 0 when
// the request must go to JS.
static int qcow2fs_zread (qcow2fs_fastmap_t *m, char *dst, uint64_t in, uint64_t n, int32_t fdw, uint64_t hw) {
  if (__atomic_load_n(&qcow2fs_codec, __ATOMIC_ACQUIRE) == NULL) return 0;
  pthread_mutex_lock(&m->zlock);
  qcow2fs_zent_t *e;
  int claimed = 0;
  // Every set entry held (being decoded or copied from): wait for one rather than decode into
  // memory of its own. libfuse starts a worker whenever none is idle, so a deep queue of reads of
  // big clusters would otherwise hold a decoded cluster per worker (hundreds of MiB with 2 MiB
  // clusters); this way the cache is all the memory decoding uses.
  for (;;) {
    e = m->zents != NULL ? qcow2fs_z_find(m, fdw, hw) : NULL;
    if (e != NULL) break;
    int nomem;
    e = qcow2fs_z_claim(m, fdw, hw, QCOW2FS_Z_LOADING, &nomem);
    if (e != NULL) {
      claimed = 1;
      break;
    }
    if (nomem) {
      pthread_mutex_unlock(&m->zlock);
      return 0;
    }
    m->zwaiting++;
    m->z_waits++;
    pthread_cond_wait(&m->zcond, &m->zlock);
    m->zwaiting--;
  }
  int ok = 0;
  if (claimed) {
    e->pins++;
    ok = qcow2fs_z_load_locked(m, e);
  } else {
    e->pins++;
    if (e->state == QCOW2FS_Z_QUEUED) {
      // Not started by a helper yet: decode it here rather than wait behind the queue.
      e->state = QCOW2FS_Z_LOADING;
      ok = qcow2fs_z_load_locked(m, e);
    } else {
      while (e->state == QCOW2FS_Z_LOADING) pthread_cond_wait(&m->zcond, &m->zlock);
      ok = e->state == QCOW2FS_Z_READY && e->fdw == fdw && e->hw == hw;
    }
  }
  if (ok) {
    e->used = ++m->ztick;
    pthread_mutex_unlock(&m->zlock);
    memcpy(dst, e->buf + in, n);
    pthread_mutex_lock(&m->zlock);
  }
  qcow2fs_z_unpin(m, e);
  pthread_mutex_unlock(&m->zlock);
  return ok;
}

// Under blocked with no reader left (quiesce, disable): forget every decoded cluster; with
// release, give their memory back too.
static void qcow2fs_z_clear (qcow2fs_fastmap_t *m, int release) {
  pthread_mutex_lock(&m->zlock);
  m->zgen++;
  m->z_last_end = 0;
  m->z_ra_next = 0;
  if (m->zents != NULL) {
    for (size_t i = 0; i < (size_t) m->zsets * m->zways; i++) {
      qcow2fs_zent_t *e = &m->zents[i];
      e->state = QCOW2FS_Z_FREE;
      e->fdw = 0;
      e->hw = 0;
      if (release) {
        free(e->buf);
        e->buf = NULL;
      }
    }
  }
  pthread_mutex_unlock(&m->zlock);
}

static int qcow2fs_fast_read (qcow2fs_fastmap_t *m, char *buf, size_t len, off_t offset) {
  if (len == 0 || offset < 0 || len > INT32_MAX) return -1;
  __atomic_add_fetch(&m->readers, 1, __ATOMIC_SEQ_CST);
  int res = -1;
  if (__atomic_load_n(&m->blocked, __ATOMIC_SEQ_CST) || __atomic_load_n(&m->disabled, __ATOMIC_SEQ_CST)) goto out;
  uint64_t size = __atomic_load_n(&m->size, __ATOMIC_ACQUIRE);
  uint64_t pos = (uint64_t) offset;
  uint64_t end = pos + len;
  if (end > size) goto out;
  uint32_t cb = m->cluster_bits;
  uint64_t cs = 1ull << cb;
  int32_t run_fd = -2;
  uint64_t run_host = 0;
  size_t run_len = 0;
  char *run_dst = buf;
  int ahead = 0;
  while (pos < end) {
    uint64_t in = pos & (cs - 1);
    uint64_t n = cs - in;
    if (n > end - pos) n = end - pos;
    int32_t fd;
    uint64_t host;
    if (!qcow2fs_slot_get(m, pos >> cb, &fd, &host)) goto out;
    if (fd >= 0 && (fd & QCOW2FS_SLOT_COMPRESSED)) {
      // The run so far first, then this cluster's part from its decoded copy.
      if (!qcow2fs_run_read(run_fd, run_dst, run_len, run_host)) goto out;
      run_fd = -2;
      run_len = 0;
      if (!ahead) {
        qcow2fs_z_readahead(m, (uint64_t) offset, end);
        ahead = 1;
      }
      if (!qcow2fs_zread(m, buf + (pos - (uint64_t) offset), in, n, fd, host)) goto out;
      pos += n;
      continue;
    }
    if (fd >= 0) fd &= QCOW2FS_SLOT_FD_MASK;
    else fd = -1;
    if (fd == run_fd && (fd < 0 || host + in == run_host + run_len)) {
      run_len += n;
    } else {
      if (!qcow2fs_run_read(run_fd, run_dst, run_len, run_host)) goto out;
      run_fd = fd;
      run_host = host + in;
      run_len = n;
      run_dst = buf + (pos - (uint64_t) offset);
    }
    pos += n;
  }
  if (!qcow2fs_run_read(run_fd, run_dst, run_len, run_host)) goto out;
  res = (int) len;
out:
  __atomic_sub_fetch(&m->readers, 1, __ATOMIC_SEQ_CST);
  if (res >= 0) __atomic_add_fetch(&m->hits, 1, __ATOMIC_RELAXED);
  else __atomic_add_fetch(&m->misses, 1, __ATOMIC_RELAXED);
  return res;
}

static int qcow2fs_read (const char *path, char *buf, size_t len, off_t offset, struct fuse_file_info *info) {
  fuse_thread_t *ft = (fuse_thread_t *) fuse_get_context()->private_data;
  uint32_t n = __atomic_load_n(&ft->n_fastmaps, __ATOMIC_ACQUIRE);
  for (uint32_t i = 0; i < n; i++) {
    qcow2fs_fastmap_t *m = ft->fastmaps[i];
    if (strcmp(m->path, path) != 0) continue;
    int res = qcow2fs_fast_read(m, buf, len, offset);
    if (res >= 0) return res;
    break;
  }
  return fuse_native_read(path, buf, len, offset, info);
}

static napi_value qcow2fs_int32 (napi_env env, int32_t v) {
  napi_value r;
  napi_create_int32(env, v, &r);
  return r;
}

// Writes len bytes from src at host of fd. 0 on an error (the request then goes to JS, which
// writes it all again).
static int qcow2fs_run_write (int32_t fd, const char *src, size_t len, uint64_t host) {
  size_t done = 0;
  while (done < len) {
    ssize_t n = pwrite(fd, src + done, len - done, (off_t) (host + done));
    if (n < 0) {
      if (errno == EINTR) continue;
      return 0;
    }
    if (n == 0) return 0;
    done += (size_t) n;
  }
  return 1;
}

// Tells JS (onLow) that the pool ran low or the log is half full; once until it supplies or takes.
static void qcow2fs_signal_low_locked (qcow2fs_fastmap_t *m) {
  if (m->low_tsfn == NULL || m->low_signaled) return;
  m->low_signaled = 1;
  napi_call_threadsafe_function(m->low_tsfn, NULL, napi_tsfn_nonblocking);
}

/*
 * Allocates, from the pool, every cluster of [pos, end) whose slot says "allocatable" (lock
 * held): the slot becomes "writable at the new host cluster" and the pair goes to the log, which
 * the engine takes before it next looks at these clusters' metadata (see direct-read.ts). 0 when
 * a slot is neither writable nor allocatable any more, the pool is empty or the log is full.
 */
static int qcow2fs_allocate_locked (qcow2fs_fastmap_t *m, uint64_t pos, uint64_t end) {
  uint32_t cb = m->cluster_bits;
  uint64_t cs = 1ull << cb;
  for (uint64_t c = pos >> cb; (c << cb) < end; c++) {
    int32_t fd;
    uint64_t host;
    if (!qcow2fs_slot_get(m, c, &fd, &host)) return 0;
    if (fd >= 0 && (fd & QCOW2FS_SLOT_WRITABLE)) continue;
    if (fd != QCOW2FS_SLOT_ALLOCATABLE) return 0;
    if (m->n_pool == 0 || m->alloc_len == m->alloc_cap) {
      qcow2fs_signal_low_locked(m);
      return 0;
    }
    qcow2fs_pool_range_t *r = &m->pool[0];
    host = r->next;
    r->next += cs;
    if (r->next >= r->end) {
      for (uint32_t i = 1; i < m->n_pool; i++) m->pool[i - 1] = m->pool[i];
      m->n_pool--;
      qcow2fs_signal_low_locked(m);
    }
    m->alloc_log[m->alloc_len * 2] = c;
    m->alloc_log[m->alloc_len * 2 + 1] = host;
    m->alloc_len++;
    if (m->alloc_len * 2 >= m->alloc_cap) qcow2fs_signal_low_locked(m);
    m->allocs++;
    qcow2fs_slot_set(m, c, m->pool_fd | QCOW2FS_SLOT_WRITABLE, host, 1);
  }
  return 1;
}

/*
 * A write whose clusters all have writable slots (clusters the active layer owns: no metadata
 * changes, as the engine's own in-place path) is done here with pwrite. JS learns of it through
 * the writes counter and makes it durable at the next flush/fsync.
 * Clusters whose slot says "allocatable" (unallocated, reading as zeros) first get a fresh host
 * cluster from the pool (it reads as zeros, so the bytes around the data need no fill).
 */
static int qcow2fs_fast_write (qcow2fs_fastmap_t *m, const char *buf, size_t len, off_t offset) {
  if (len == 0 || offset < 0 || len > INT32_MAX) return -1;
  __atomic_add_fetch(&m->readers, 1, __ATOMIC_SEQ_CST);
  int res = -1;
  if (__atomic_load_n(&m->blocked, __ATOMIC_SEQ_CST) || __atomic_load_n(&m->disabled, __ATOMIC_SEQ_CST)) goto out;
  uint64_t size = __atomic_load_n(&m->size, __ATOMIC_ACQUIRE);
  uint64_t pos = (uint64_t) offset;
  uint64_t end = pos + len;
  if (end > size) goto out;
  uint32_t cb = m->cluster_bits;
  uint64_t cs = 1ull << cb;
  int need_alloc = 0;
  for (uint64_t c = pos >> cb; (c << cb) < end; c++) {
    int32_t fd;
    uint64_t host;
    if (!qcow2fs_slot_get(m, c, &fd, &host)) goto out;
    if (fd == QCOW2FS_SLOT_ALLOCATABLE) need_alloc = 1;
    else if (fd < 0 || !(fd & QCOW2FS_SLOT_WRITABLE)) goto out;
  }
  if (need_alloc) {
    pthread_mutex_lock(&m->lock);
    int ok = qcow2fs_allocate_locked(m, pos, end);
    pthread_mutex_unlock(&m->lock);
    if (!ok) goto out;
  }
  int32_t run_fd = -2;
  uint64_t run_host = 0;
  size_t run_len = 0;
  const char *run_src = buf;
  while (pos < end) {
    uint64_t in = pos & (cs - 1);
    uint64_t n = cs - in;
    if (n > end - pos) n = end - pos;
    int32_t fd;
    uint64_t host;
    if (!qcow2fs_slot_get(m, pos >> cb, &fd, &host)) goto out;
    if (fd < 0 || !(fd & QCOW2FS_SLOT_WRITABLE)) goto out;
    fd &= QCOW2FS_SLOT_FD_MASK;
    if (fd == run_fd && host + in == run_host + run_len) {
      run_len += n;
    } else {
      if (run_len > 0 && !qcow2fs_run_write(run_fd, run_src, run_len, run_host)) goto out;
      run_fd = fd;
      run_host = host + in;
      run_len = n;
      run_src = buf + (pos - (uint64_t) offset);
    }
    pos += n;
  }
  if (run_len > 0 && !qcow2fs_run_write(run_fd, run_src, run_len, run_host)) goto out;
  __atomic_add_fetch(&m->writes, 1, __ATOMIC_SEQ_CST);
  res = (int) len;
out:
  __atomic_sub_fetch(&m->readers, 1, __ATOMIC_SEQ_CST);
  if (res < 0) __atomic_add_fetch(&m->write_misses, 1, __ATOMIC_RELAXED);
  return res;
}

static int qcow2fs_write (const char *path, const char *buf, size_t len, off_t offset, struct fuse_file_info *info) {
  fuse_thread_t *ft = (fuse_thread_t *) fuse_get_context()->private_data;
  uint32_t n = __atomic_load_n(&ft->n_fastmaps, __ATOMIC_ACQUIRE);
  for (uint32_t i = 0; i < n; i++) {
    qcow2fs_fastmap_t *m = ft->fastmaps[i];
    if (strcmp(m->path, path) != 0) continue;
    int res = qcow2fs_fast_write(m, buf, len, offset);
    if (res >= 0) return res;
    break;
  }
  return fuse_native_write(path, buf, len, offset, info);
}

static qcow2fs_fastmap_t *qcow2fs_fastmap_of (fuse_thread_t *ft, uint32_t index) {
  uint32_t n = __atomic_load_n(&ft->n_fastmaps, __ATOMIC_ACQUIRE);
  return index < n ? ft->fastmaps[index] : NULL;
}

// fastmap_attach(thread, path, clusterBits, slotBits, size) -> index (or -1)
NAPI_METHOD(qcow2fs_fastmap_attach) {
  NAPI_ARGV(5)
  NAPI_ARGV_BUFFER_CAST(fuse_thread_t *, ft, 0);
  NAPI_ARGV_UTF8(path, 1024, 1);
  NAPI_ARGV_UINT32(cluster_bits, 2);
  NAPI_ARGV_UINT32(slot_bits, 3);
  double size;
  napi_get_value_double(env, argv[4], &size);
  uint32_t n = ft->n_fastmaps;
  if (n >= QCOW2FS_MAX_FASTMAPS || cluster_bits < 9 || cluster_bits > 30 || slot_bits > 24) return qcow2fs_int32(env, -1);
  qcow2fs_fastmap_t *m = calloc(1, sizeof(qcow2fs_fastmap_t));
  if (m == NULL) return qcow2fs_int32(env, -1);
  m->slots = calloc((size_t) 1 << slot_bits, sizeof(qcow2fs_slot_t));
  if (m->slots == NULL) {
    free(m);
    return qcow2fs_int32(env, -1);
  }
  m->alloc_cap = QCOW2FS_ALLOC_LOG_PAIRS;
  m->alloc_log = calloc((size_t) m->alloc_cap * 2, sizeof(uint64_t));
  if (m->alloc_log == NULL) {
    free(m->slots);
    free(m);
    return qcow2fs_int32(env, -1);
  }
  pthread_mutex_init(&m->lock, NULL);
  pthread_mutex_init(&m->zlock, NULL);
  pthread_cond_init(&m->zcond, NULL);
  snprintf(m->path, sizeof(m->path), "%s", path);
  m->cluster_bits = cluster_bits;
  qcow2fs_z_size(m);
  m->slot_mask = ((uint64_t) 1 << slot_bits) - 1;
  m->size = size > 0 ? (uint64_t) size : 0;
  ft->fastmaps[n] = m;
  __atomic_store_n(&ft->n_fastmaps, n + 1, __ATOMIC_RELEASE);
  return qcow2fs_int32(env, (int32_t) n);
}

// fastmap_publish(thread, index, Float64Array [first cluster, clusters, fd, host, ...], runs,
// adopted) -> whether published: each run of clusters gets consecutive host clusters from host
// (fd -1 = zeros, -2 = zeros and allocatable); refused unless `adopted` (allocations the engine
// has taken into its metadata) equals the allocations done here.
NAPI_METHOD(qcow2fs_fastmap_publish) {
  NAPI_ARGV(5)
  NAPI_ARGV_BUFFER_CAST(fuse_thread_t *, ft, 0);
  NAPI_ARGV_UINT32(index, 1);
  NAPI_ARGV_UINT32(count, 3);
  qcow2fs_fastmap_t *m = qcow2fs_fastmap_of(ft, index);
  if (m == NULL) return NULL;
  napi_typedarray_type type;
  size_t length;
  void *data;
  napi_value ab;
  size_t byte_offset;
  if (napi_get_typedarray_info(env, argv[2], &type, &length, &data, &ab, &byte_offset) != napi_ok || type != napi_float64_array) return NULL;
  if ((size_t) count * 4 > length) count = (uint32_t) (length / 4);
  double adopted;
  napi_get_value_double(env, argv[4], &adopted);
  double *t = (double *) data;
  uint64_t cs = 1ull << m->cluster_bits;
  pthread_mutex_lock(&m->lock);
  // The engine's answers are stale while allocations done here are not in its metadata yet.
  int ok = (double) m->allocs == adopted;
  if (ok) {
    for (uint32_t i = 0; i < count; i++) {
      uint64_t first = (uint64_t) t[i * 4];
      uint64_t n = (uint64_t) t[i * 4 + 1];
      int32_t fd = (int32_t) t[i * 4 + 2];
      uint64_t host = (uint64_t) t[i * 4 + 3];
      // A run longer than the table only overwrites itself: its last slots win.
      if (n > m->slot_mask + 1) {
        uint64_t skip = n - (m->slot_mask + 1);
        first += skip;
        if (fd >= 0) host += skip * cs;
        n = m->slot_mask + 1;
      }
      for (uint64_t k = 0; k < n; k++) qcow2fs_slot_set(m, first + k, fd, fd >= 0 ? host + k * cs : 0, 1);
    }
  }
  pthread_mutex_unlock(&m->lock);
  napi_value r;
  napi_get_boolean(env, ok, &r);
  return r;
}

// fastmap_take_allocations(thread, index, Float64Array out) -> pairs moved from the log into out
NAPI_METHOD(qcow2fs_fastmap_take_allocations) {
  NAPI_ARGV(3)
  NAPI_ARGV_BUFFER_CAST(fuse_thread_t *, ft, 0);
  NAPI_ARGV_UINT32(index, 1);
  qcow2fs_fastmap_t *m = qcow2fs_fastmap_of(ft, index);
  napi_typedarray_type type;
  size_t length;
  void *data;
  napi_value ab;
  size_t byte_offset;
  if (m == NULL || napi_get_typedarray_info(env, argv[2], &type, &length, &data, &ab, &byte_offset) != napi_ok || type != napi_float64_array) return qcow2fs_int32(env, 0);
  double *out = (double *) data;
  pthread_mutex_lock(&m->lock);
  uint32_t n = m->alloc_len;
  if ((size_t) n * 2 > length) n = (uint32_t) (length / 2);
  // From the end (the order does not matter: no cluster is in the log twice), so nothing moves.
  m->alloc_len -= n;
  const uint64_t *from = m->alloc_log + (size_t) m->alloc_len * 2;
  for (uint32_t i = 0; i < n * 2; i++) out[i] = (double) from[i];
  if (n > 0) m->low_signaled = 0;
  pthread_mutex_unlock(&m->lock);
  return qcow2fs_int32(env, (int32_t) n);
}

// fastmap_supply(thread, index, fd, host, bytes) -> whether the range joined the pool
NAPI_METHOD(qcow2fs_fastmap_supply) {
  NAPI_ARGV(5)
  NAPI_ARGV_BUFFER_CAST(fuse_thread_t *, ft, 0);
  NAPI_ARGV_UINT32(index, 1);
  NAPI_ARGV_INT32(fd, 2);
  double host, bytes;
  napi_get_value_double(env, argv[3], &host);
  napi_get_value_double(env, argv[4], &bytes);
  qcow2fs_fastmap_t *m = qcow2fs_fastmap_of(ft, index);
  int ok = 0;
  if (m != NULL && fd >= 0 && bytes > 0) {
    pthread_mutex_lock(&m->lock);
    if (m->n_pool < QCOW2FS_MAX_POOL_RANGES && (m->n_pool == 0 || m->pool_fd == fd)) {
      m->pool_fd = fd;
      m->pool[m->n_pool].next = (uint64_t) host;
      m->pool[m->n_pool].end = (uint64_t) host + (uint64_t) bytes;
      m->n_pool++;
      m->low_signaled = 0;
      ok = 1;
    }
    pthread_mutex_unlock(&m->lock);
  }
  napi_value r;
  napi_get_boolean(env, ok, &r);
  return r;
}

// fastmap_take_pool(thread, index) -> [host, bytes, ...] of the pool's unused ranges, now empty
NAPI_METHOD(qcow2fs_fastmap_take_pool) {
  NAPI_ARGV(2)
  NAPI_ARGV_BUFFER_CAST(fuse_thread_t *, ft, 0);
  NAPI_ARGV_UINT32(index, 1);
  qcow2fs_fastmap_t *m = qcow2fs_fastmap_of(ft, index);
  double vals[QCOW2FS_MAX_POOL_RANGES * 2];
  uint32_t n = 0;
  if (m != NULL) {
    pthread_mutex_lock(&m->lock);
    for (uint32_t i = 0; i < m->n_pool; i++) {
      vals[n++] = (double) m->pool[i].next;
      vals[n++] = (double) (m->pool[i].end - m->pool[i].next);
    }
    m->n_pool = 0;
    pthread_mutex_unlock(&m->lock);
  }
  napi_value arr;
  napi_create_array_with_length(env, n, &arr);
  for (uint32_t i = 0; i < n; i++) {
    napi_value v;
    napi_create_double(env, vals[i], &v);
    napi_set_element(env, arr, i, v);
  }
  return arr;
}

// fastmap_invalidate(thread, index, firstCluster, count); count -1: every slot.
NAPI_METHOD(qcow2fs_fastmap_invalidate) {
  NAPI_ARGV(4)
  NAPI_ARGV_BUFFER_CAST(fuse_thread_t *, ft, 0);
  NAPI_ARGV_UINT32(index, 1);
  double first, count;
  napi_get_value_double(env, argv[2], &first);
  napi_get_value_double(env, argv[3], &count);
  qcow2fs_fastmap_t *m = qcow2fs_fastmap_of(ft, index);
  if (m == NULL) return NULL;
  pthread_mutex_lock(&m->lock);
  if (count < 0 || count > (double) m->slot_mask) {
    for (uint64_t i = 0; i <= m->slot_mask; i++) {
      qcow2fs_slot_t *s = &m->slots[i];
      if (__atomic_load_n(&s->key, __ATOMIC_RELAXED) != 0) qcow2fs_slot_set(m, __atomic_load_n(&s->key, __ATOMIC_RELAXED) - 1, -1, 0, 0);
    }
  } else {
    for (uint64_t c = (uint64_t) first; c < (uint64_t) first + (uint64_t) count; c++) qcow2fs_slot_set(m, c, -1, 0, 0);
  }
  pthread_mutex_unlock(&m->lock);
  return NULL;
}

// fastmap_quiesce(thread, index): returns once no fast read that started before it still runs.
NAPI_METHOD(qcow2fs_fastmap_quiesce) {
  NAPI_ARGV(2)
  NAPI_ARGV_BUFFER_CAST(fuse_thread_t *, ft, 0);
  NAPI_ARGV_UINT32(index, 1);
  qcow2fs_fastmap_t *m = qcow2fs_fastmap_of(ft, index);
  if (m == NULL) return NULL;
  __atomic_store_n(&m->blocked, 1, __ATOMIC_SEQ_CST);
  while (__atomic_load_n(&m->readers, __ATOMIC_SEQ_CST) != 0) sched_yield();
  // Freed host bytes may be reused: decoded copies of compressed clusters there are stale.
  qcow2fs_z_clear(m, 0);
  __atomic_store_n(&m->blocked, 0, __ATOMIC_SEQ_CST);
  return NULL;
}

// fastmap_set_size(thread, index, size)
NAPI_METHOD(qcow2fs_fastmap_set_size) {
  NAPI_ARGV(3)
  NAPI_ARGV_BUFFER_CAST(fuse_thread_t *, ft, 0);
  NAPI_ARGV_UINT32(index, 1);
  double size;
  napi_get_value_double(env, argv[2], &size);
  qcow2fs_fastmap_t *m = qcow2fs_fastmap_of(ft, index);
  if (m == NULL) return NULL;
  __atomic_store_n(&m->size, size > 0 ? (uint64_t) size : 0, __ATOMIC_RELEASE);
  return NULL;
}

// fastmap_disable(thread, index): every later read goes to JS; returns once running ones ended.
NAPI_METHOD(qcow2fs_fastmap_disable) {
  NAPI_ARGV(2)
  NAPI_ARGV_BUFFER_CAST(fuse_thread_t *, ft, 0);
  NAPI_ARGV_UINT32(index, 1);
  qcow2fs_fastmap_t *m = qcow2fs_fastmap_of(ft, index);
  if (m == NULL) return NULL;
  __atomic_store_n(&m->disabled, 1, __ATOMIC_SEQ_CST);
  while (__atomic_load_n(&m->readers, __ATOMIC_SEQ_CST) != 0) sched_yield();
  qcow2fs_z_clear(m, 1);
  return NULL;
}

// fastmap_stats(thread, index) -> [read hits, read misses, writes done here, write misses,
//   allocations done here, of them not taken by JS yet, pool bytes left, compressed clusters
//   decoded here, of them by read-ahead]
// fastmap_on_low(thread, index, callback): called when the pool runs low or the log fills
NAPI_METHOD(qcow2fs_fastmap_on_low) {
  NAPI_ARGV(3)
  NAPI_ARGV_BUFFER_CAST(fuse_thread_t *, ft, 0);
  NAPI_ARGV_UINT32(index, 1);
  qcow2fs_fastmap_t *m = qcow2fs_fastmap_of(ft, index);
  if (m == NULL || m->low_tsfn != NULL) return NULL;
  napi_value name;
  napi_create_string_utf8(env, "qcow2fs_pool_low", NAPI_AUTO_LENGTH, &name);
  napi_threadsafe_function tsfn;
  if (napi_create_threadsafe_function(env, argv[2], NULL, name, 0, 1, NULL, NULL, NULL, NULL, &tsfn) != napi_ok) return NULL;
  // It must not keep the process alive.
  napi_unref_threadsafe_function(env, tsfn);
  pthread_mutex_lock(&m->lock);
  m->low_tsfn = tsfn;
  pthread_mutex_unlock(&m->lock);
  return NULL;
}

// fastmap_pending(thread, index) -> allocations done here that JS has not taken yet
NAPI_METHOD(qcow2fs_fastmap_pending) {
  NAPI_ARGV(2)
  NAPI_ARGV_BUFFER_CAST(fuse_thread_t *, ft, 0);
  NAPI_ARGV_UINT32(index, 1);
  qcow2fs_fastmap_t *m = qcow2fs_fastmap_of(ft, index);
  return qcow2fs_int32(env, m == NULL ? 0 : (int32_t) __atomic_load_n(&m->alloc_len, __ATOMIC_RELAXED));
}

NAPI_METHOD(qcow2fs_fastmap_stats) {
  NAPI_ARGV(2)
  NAPI_ARGV_BUFFER_CAST(fuse_thread_t *, ft, 0);
  NAPI_ARGV_UINT32(index, 1);
  qcow2fs_fastmap_t *m = qcow2fs_fastmap_of(ft, index);
  uint64_t vals[10] = { 0, 0, 0, 0, 0, 0, 0, 0, 0, 0 };
  if (m != NULL) {
    vals[0] = __atomic_load_n(&m->hits, __ATOMIC_RELAXED);
    vals[1] = __atomic_load_n(&m->misses, __ATOMIC_RELAXED);
    vals[2] = __atomic_load_n(&m->writes, __ATOMIC_SEQ_CST);
    vals[3] = __atomic_load_n(&m->write_misses, __ATOMIC_RELAXED);
    pthread_mutex_lock(&m->lock);
    vals[4] = m->allocs;
    vals[5] = m->alloc_len;
    for (uint32_t i = 0; i < m->n_pool; i++) vals[6] += m->pool[i].end - m->pool[i].next;
    pthread_mutex_unlock(&m->lock);
    vals[7] = __atomic_load_n(&m->z_decoded, __ATOMIC_RELAXED);
    vals[8] = __atomic_load_n(&m->z_ahead, __ATOMIC_RELAXED);
    pthread_mutex_lock(&m->zlock);
    vals[9] = m->z_waits;
    pthread_mutex_unlock(&m->zlock);
  }
  napi_value arr;
  napi_create_array_with_length(env, 10, &arr);
  for (uint32_t i = 0; i < 10; i++) {
    napi_value v;
    napi_create_double(env, (double) vals[i], &v);
    napi_set_element(env, arr, i, v);
  }
  return arr;
}

// set_codec(external from the codec addon's api()) -> whether compressed slots can be read here
NAPI_METHOD(qcow2fs_set_codec) {
  NAPI_ARGV(1)
  void *p = NULL;
  int ok = napi_get_value_external(env, argv[0], &p) == napi_ok && p != NULL && ((const qcow2fs_codec_api_t *) p)->version == 1;
  if (ok) __atomic_store_n(&qcow2fs_codec, (const qcow2fs_codec_api_t *) p, __ATOMIC_RELEASE);
  napi_value r;
  napi_get_boolean(env, ok, &r);
  return r;
}

NAPI_METHOD(fuse_native_init_flags) {
  NAPI_ARGV(1)
  NAPI_ARGV_BUFFER_CAST(fuse_thread_t *, ft, 0);
  NAPI_RETURN_UINT32(ft->init_flags_sent)
}

NAPI_METHOD(fuse_native_mount) {
  NAPI_ARGV(8)

  NAPI_ARGV_UTF8(mnt, 1024, 0);
  NAPI_ARGV_UTF8(mntopts, 1024, 1);
  NAPI_ARGV_BUFFER_CAST(fuse_thread_t *, ft, 2);
  napi_create_reference(env, argv[3], 1, &(ft->ctx));
  napi_create_reference(env, argv[4], 1, &(ft->malloc));
  napi_value handlers = argv[5];
  NAPI_ARGV_BUFFER_CAST(uint32_t *, implemented, 6)

  for (int i = 0; i < 35; i++) {
    ft->handlers[i] = NULL;
  }

  NAPI_FOR_EACH(handlers, handler) {
    napi_create_reference(env, handler, 1, &ft->handlers[i]);
  }

  ft->env = env;

  struct fuse_operations ops = { };
  if (implemented[op_access]) ops.access = fuse_native_access;
  if (implemented[op_truncate]) ops.truncate = fuse_native_truncate;
  if (implemented[op_ftruncate]) ops.ftruncate = fuse_native_ftruncate;
  if (implemented[op_getattr]) ops.getattr = fuse_native_getattr;
  if (implemented[op_fgetattr]) ops.fgetattr = fuse_native_fgetattr;
  if (implemented[op_flush]) ops.flush = fuse_native_flush;
  if (implemented[op_fsync]) ops.fsync = fuse_native_fsync;
  if (implemented[op_fsyncdir]) ops.fsyncdir = fuse_native_fsyncdir;
  if (implemented[op_readdir]) ops.readdir = fuse_native_readdir;
  if (implemented[op_readlink]) ops.readlink = fuse_native_readlink;
  if (implemented[op_chown]) ops.chown = fuse_native_chown;
  if (implemented[op_chmod]) ops.chmod = fuse_native_chmod;
  if (implemented[op_mknod]) ops.mknod = fuse_native_mknod;
  if (implemented[op_setxattr]) ops.setxattr = fuse_native_setxattr;
  if (implemented[op_getxattr]) ops.getxattr = fuse_native_getxattr;
  if (implemented[op_listxattr]) ops.listxattr = fuse_native_listxattr;
  if (implemented[op_removexattr]) ops.removexattr = fuse_native_removexattr;
  if (implemented[op_statfs]) ops.statfs = fuse_native_statfs;
  if (implemented[op_open]) ops.open = fuse_native_open;
  if (implemented[op_opendir]) ops.opendir = fuse_native_opendir;
  if (implemented[op_read]) ops.read = qcow2fs_read;
  if (implemented[op_write]) ops.write = qcow2fs_write;
  if (implemented[op_release]) ops.release = fuse_native_release;
  if (implemented[op_releasedir]) ops.releasedir = fuse_native_releasedir;
  if (implemented[op_create]) ops.create = fuse_native_create;
  if (implemented[op_utimens]) ops.utimens = fuse_native_utimens;
  if (implemented[op_unlink]) ops.unlink = fuse_native_unlink;
  if (implemented[op_rename]) ops.rename = fuse_native_rename;
  if (implemented[op_link]) ops.link = fuse_native_link;
  if (implemented[op_symlink]) ops.symlink = fuse_native_symlink;
  if (implemented[op_mkdir]) ops.mkdir = fuse_native_mkdir;
  if (implemented[op_rmdir]) ops.rmdir = fuse_native_rmdir;
  if (implemented[op_fallocate]) ops.fallocate = fuse_native_fallocate;
  if (implemented[op_init]) ops.init = fuse_native_init;

  int _argc = (strcmp(mntopts, "-o") <= 0) ? 1 : 2;
  char *_argv[] = {
    (char *) "fuse_bindings_dummy",
    (char *) mntopts
  };

  struct fuse_args args = FUSE_ARGS_INIT(_argc, _argv);
  struct fuse_chan *kch = fuse_mount(mnt, &args);

  if (kch == NULL) {
    napi_throw_error(env, "fuse failed", "fuse failed");
    return NULL;
  }

  // qcow2fs: argv[7] is [asyncDio (0/1), maxPages (0: libfuse's 32)].
  {
    uint32_t *init_opts = NULL;
    size_t init_opts_len = 0;
    bool is_buffer = false;
    napi_is_buffer(env, argv[7], &is_buffer);
    if (is_buffer) napi_get_buffer_info(env, argv[7], (void **) &init_opts, &init_opts_len);
    ft->want_async_dio = init_opts_len >= 8 ? init_opts[0] : 0;
    ft->max_pages = init_opts_len >= 8 ? init_opts[1] : 0;
    if (ft->max_pages > 256) ft->max_pages = 256;
    ft->init_unique = 0;
    ft->kernel_flags = 0;
    ft->init_flags_sent = 0;
  }
  // The same /dev/fuse descriptor behind qcow2fs's channel (above). libfuse's own channel object
  // from fuse_mount is left unused (not destroyed: that would close the descriptor).
  // The channel's buffer size is what libfuse reads each request into, and it caps max_write
  // (libfuse answers INIT with at most bufsize - 4096): with max_pages, room for requests of
  // max_pages pages plus the header page, so writes can be as large as reads.
  size_t bufsize = fuse_chan_bufsize(kch);
  if (ft->max_pages > 32 && (size_t) ft->max_pages * 4096 + 4096 > bufsize) bufsize = (size_t) ft->max_pages * 4096 + 4096;
  struct fuse_chan *ch = fuse_chan_new(&qcow2fs_chan_ops, fuse_chan_fd(kch), bufsize, ft);
  if (ch == NULL) {
    napi_throw_error(env, "fuse failed", "fuse failed");
    return NULL;
  }

  struct fuse *fuse = fuse_new(ch, &args, &ops, sizeof(struct fuse_operations), ft);

  uv_mutex_init(&(ft->mut));
  uv_sem_init(&(ft->sem), 0);

  strncpy(ft->mnt, mnt, 1024);
  strncpy(ft->mntopts, mntopts, 1024);
  ft->fuse = fuse;
  ft->ch = ch;
  ft->mounted++;

  int err = uv_async_init(uv_default_loop(), &(ft->async), (uv_async_cb) fuse_native_async_init);

  if (fuse == NULL || err < 0) {
    napi_throw_error(env, "fuse failed", "fuse failed");
    return NULL;
  }

  pthread_attr_init(&(ft->attr));
  pthread_create(&(ft->thread), &(ft->attr), start_fuse_thread, ft);

  return NULL;
}

NAPI_METHOD(fuse_native_unmount) {
  NAPI_ARGV(2)
  NAPI_ARGV_UTF8(mnt, 1024, 0);
  NAPI_ARGV_BUFFER_CAST(fuse_thread_t *, ft, 1);

  if (ft != NULL && ft->mounted) {
    // TODO: Investigate why the FUSE thread is not always killed after fusermount.
    // pthread_join(ft->thread, NULL);
  }

  // TODO: fix the async holding the loop
  uv_unref((uv_handle_t *) &(ft->async));
  ft->mounted--;

  return NULL;
}

NAPI_INIT() {
  const napi_node_version* version;
  assert(napi_get_node_version(env, &version) == napi_ok);

  if (version->major > 12 || (version->major == 12 && version->minor >= 16)) {
    IS_ARRAY_BUFFER_DETACH_SUPPORTED = 1;
  }

  pthread_key_create(&(thread_locals_key), release_thread_locals);
  uv_mutex_init(&free_locals_mut);

  NAPI_EXPORT_SIZEOF(fuse_thread_t)

  NAPI_EXPORT_FUNCTION(fuse_native_mount)
  NAPI_EXPORT_FUNCTION(fuse_native_init_flags)
  NAPI_EXPORT_UINT32(qcow2fs_patched)
  NAPI_EXPORT_FUNCTION(qcow2fs_fastmap_attach)
  NAPI_EXPORT_FUNCTION(qcow2fs_fastmap_publish)
  NAPI_EXPORT_FUNCTION(qcow2fs_fastmap_invalidate)
  NAPI_EXPORT_FUNCTION(qcow2fs_fastmap_quiesce)
  NAPI_EXPORT_FUNCTION(qcow2fs_fastmap_set_size)
  NAPI_EXPORT_FUNCTION(qcow2fs_fastmap_disable)
  NAPI_EXPORT_FUNCTION(qcow2fs_fastmap_stats)
  NAPI_EXPORT_FUNCTION(qcow2fs_fastmap_take_allocations)
  NAPI_EXPORT_FUNCTION(qcow2fs_fastmap_supply)
  NAPI_EXPORT_FUNCTION(qcow2fs_fastmap_take_pool)
  NAPI_EXPORT_FUNCTION(qcow2fs_fastmap_pending)
  NAPI_EXPORT_FUNCTION(qcow2fs_fastmap_on_low)
  NAPI_EXPORT_FUNCTION(qcow2fs_set_codec)
  NAPI_EXPORT_FUNCTION(fuse_native_unmount)

  NAPI_EXPORT_FUNCTION(fuse_native_signal_getattr)
  NAPI_EXPORT_FUNCTION(fuse_native_signal_init)
  NAPI_EXPORT_FUNCTION(fuse_native_signal_access)
  NAPI_EXPORT_FUNCTION(fuse_native_signal_statfs)
  NAPI_EXPORT_FUNCTION(fuse_native_signal_fgetattr)
  NAPI_EXPORT_FUNCTION(fuse_native_signal_getattr)
  NAPI_EXPORT_FUNCTION(fuse_native_signal_flush)
  NAPI_EXPORT_FUNCTION(fuse_native_signal_fsync)
  NAPI_EXPORT_FUNCTION(fuse_native_signal_fsyncdir)
  NAPI_EXPORT_FUNCTION(fuse_native_signal_readdir)
  NAPI_EXPORT_FUNCTION(fuse_native_signal_truncate)
  NAPI_EXPORT_FUNCTION(fuse_native_signal_ftruncate)
  NAPI_EXPORT_FUNCTION(fuse_native_signal_utimens)
  NAPI_EXPORT_FUNCTION(fuse_native_signal_readlink)
  NAPI_EXPORT_FUNCTION(fuse_native_signal_chown)
  NAPI_EXPORT_FUNCTION(fuse_native_signal_chmod)
  NAPI_EXPORT_FUNCTION(fuse_native_signal_mknod)
  NAPI_EXPORT_FUNCTION(fuse_native_signal_setxattr)
  NAPI_EXPORT_FUNCTION(fuse_native_signal_getxattr)
  NAPI_EXPORT_FUNCTION(fuse_native_signal_listxattr)
  NAPI_EXPORT_FUNCTION(fuse_native_signal_removexattr)
  NAPI_EXPORT_FUNCTION(fuse_native_signal_open)
  NAPI_EXPORT_FUNCTION(fuse_native_signal_opendir)
  NAPI_EXPORT_FUNCTION(fuse_native_signal_read)
  NAPI_EXPORT_FUNCTION(fuse_native_signal_write)
  NAPI_EXPORT_FUNCTION(fuse_native_signal_release)
  NAPI_EXPORT_FUNCTION(fuse_native_signal_releasedir)
  NAPI_EXPORT_FUNCTION(fuse_native_signal_create)
  NAPI_EXPORT_FUNCTION(fuse_native_signal_unlink)
  NAPI_EXPORT_FUNCTION(fuse_native_signal_rename)
  NAPI_EXPORT_FUNCTION(fuse_native_signal_link)
  NAPI_EXPORT_FUNCTION(fuse_native_signal_symlink)
  NAPI_EXPORT_FUNCTION(fuse_native_signal_mkdir)
  NAPI_EXPORT_FUNCTION(fuse_native_signal_rmdir)
  NAPI_EXPORT_FUNCTION(fuse_native_signal_fallocate)

  NAPI_EXPORT_UINT32(op_getattr)
  NAPI_EXPORT_UINT32(op_init)
  NAPI_EXPORT_UINT32(op_error)
  NAPI_EXPORT_UINT32(op_access)
  NAPI_EXPORT_UINT32(op_statfs)
  NAPI_EXPORT_UINT32(op_fgetattr)
  NAPI_EXPORT_UINT32(op_getattr)
  NAPI_EXPORT_UINT32(op_flush)
  NAPI_EXPORT_UINT32(op_fsync)
  NAPI_EXPORT_UINT32(op_fsyncdir)
  NAPI_EXPORT_UINT32(op_readdir)
  NAPI_EXPORT_UINT32(op_truncate)
  NAPI_EXPORT_UINT32(op_ftruncate)
  NAPI_EXPORT_UINT32(op_utimens)
  NAPI_EXPORT_UINT32(op_readlink)
  NAPI_EXPORT_UINT32(op_chown)
  NAPI_EXPORT_UINT32(op_chmod)
  NAPI_EXPORT_UINT32(op_mknod)
  NAPI_EXPORT_UINT32(op_setxattr)
  NAPI_EXPORT_UINT32(op_getxattr)
  NAPI_EXPORT_UINT32(op_listxattr)
  NAPI_EXPORT_UINT32(op_removexattr)
  NAPI_EXPORT_UINT32(op_open)
  NAPI_EXPORT_UINT32(op_opendir)
  NAPI_EXPORT_UINT32(op_read)
  NAPI_EXPORT_UINT32(op_write)
  NAPI_EXPORT_UINT32(op_release)
  NAPI_EXPORT_UINT32(op_releasedir)
  NAPI_EXPORT_UINT32(op_create)
  NAPI_EXPORT_UINT32(op_unlink)
  NAPI_EXPORT_UINT32(op_rename)
  NAPI_EXPORT_UINT32(op_link)
  NAPI_EXPORT_UINT32(op_symlink)
  NAPI_EXPORT_UINT32(op_mkdir)
  NAPI_EXPORT_UINT32(op_rmdir)
  NAPI_EXPORT_UINT32(op_fallocate)
}
