/*
 * qcow2fs_io: preadv2(2) with RWF_NOWAIT. It copies from the page cache on the calling thread
 * and returns EAGAIN instead of blocking when the data would have to come from the disk. A
 * FUSE request served from the cache then needs no round trip through libuv's thread pool (two
 * thread hand-offs, which cost more than the copy); only real disk reads go to the pool.
 *
 *   preadNowait(fd, buffer, offset, length, position) -> bytes read (0 at end of file, fewer
 *   than length when only part is cached), or a negative errno (-EAGAIN: not cached).
 *
 * And lseek(2) with SEEK_DATA / SEEK_HOLE, which Node does not expose, so that `map` can tell
 * holes in the host file apart from data, as qemu-img map does:
 *
 *   seekDataHole(fd, position, wantHole) -> the offset of the next data (or hole) at or after
 *   position, or a negative errno (-ENXIO: no data after position).
 *
 * And fallocate(2), for discarding ranges of raw images (punch a hole, keep the size):
 *
 *   punchHole(fd, position, length) -> 0, or a negative errno (-EOPNOTSUPP: not on this
 *   file system).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdbool.h>
#include <sys/uio.h>
#include <unistd.h>
#include <fcntl.h>
#include <node_api.h>

#ifndef RWF_NOWAIT
#define RWF_NOWAIT 0x00000008
#endif

static napi_value number(napi_env env, int64_t v) {
  napi_value out;
  napi_create_int64(env, v, &out);
  return out;
}

static napi_value pread_nowait(napi_env env, napi_callback_info info) {
  size_t argc = 5;
  napi_value argv[5];
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc != 5) {
    napi_throw_type_error(env, NULL, "expected (fd, buffer, offset, length, position)");
    return NULL;
  }
  int32_t fd;
  int64_t offset, length, position;
  napi_typedarray_type type;
  size_t elements;
  void *data;
  napi_value arraybuffer;
  size_t byte_offset;
  if (napi_get_value_int32(env, argv[0], &fd) != napi_ok ||
      napi_get_typedarray_info(env, argv[1], &type, &elements, &data, &arraybuffer, &byte_offset) != napi_ok ||
      type != napi_uint8_array || napi_get_value_int64(env, argv[2], &offset) != napi_ok ||
      napi_get_value_int64(env, argv[3], &length) != napi_ok || napi_get_value_int64(env, argv[4], &position) != napi_ok ||
      fd < 0 || offset < 0 || length < 0 || position < 0 || (uint64_t)(offset + length) > elements) {
    napi_throw_type_error(env, NULL, "expected (fd, Uint8Array, offset, length, position) inside the array");
    return NULL;
  }
  struct iovec iov = {(char *)data + offset, (size_t)length};
  ssize_t n;
  do {
    n = preadv2(fd, &iov, 1, position, RWF_NOWAIT);
  } while (n == -1 && errno == EINTR);
  return number(env, n == -1 ? -(int64_t)errno : (int64_t)n);
}

static napi_value seek_data_hole(napi_env env, napi_callback_info info) {
  size_t argc = 3;
  napi_value argv[3];
  int32_t fd;
  int64_t position;
  bool want_hole;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc != 3 ||
      napi_get_value_int32(env, argv[0], &fd) != napi_ok || napi_get_value_int64(env, argv[1], &position) != napi_ok ||
      napi_get_value_bool(env, argv[2], &want_hole) != napi_ok || fd < 0 || position < 0) {
    napi_throw_type_error(env, NULL, "expected (fd, position, wantHole)");
    return NULL;
  }
  off_t r = lseek(fd, (off_t)position, want_hole ? SEEK_HOLE : SEEK_DATA);
  return number(env, r == (off_t)-1 ? -(int64_t)errno : (int64_t)r);
}

static napi_value punch_hole(napi_env env, napi_callback_info info) {
  size_t argc = 3;
  napi_value argv[3];
  int32_t fd;
  int64_t position, length;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc != 3 ||
      napi_get_value_int32(env, argv[0], &fd) != napi_ok || napi_get_value_int64(env, argv[1], &position) != napi_ok ||
      napi_get_value_int64(env, argv[2], &length) != napi_ok || fd < 0 || position < 0 || length < 0) {
    napi_throw_type_error(env, NULL, "expected (fd, position, length)");
    return NULL;
  }
  int r = fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)position, (off_t)length);
  return number(env, r == -1 ? -(int64_t)errno : 0);
}

static napi_value init(napi_env env, napi_value exports) {
  napi_property_descriptor props[] = {
    {"preadNowait", NULL, pread_nowait, NULL, NULL, NULL, napi_default, NULL},
    {"seekDataHole", NULL, seek_data_hole, NULL, NULL, NULL, napi_default, NULL},
    {"punchHole", NULL, punch_hole, NULL, NULL, NULL, napi_default, NULL},
  };
  napi_define_properties(env, exports, sizeof props / sizeof props[0], props);
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, init)
