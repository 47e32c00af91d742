/*
 * qcow2fs_lock: the one system call Node cannot make, fcntl(2) with open-file-description
 * locks (F_OFD_SETLK / F_OFD_GETLK). QEMU guards image files with such byte-range locks, so
 * taking the same ones is the only way to be seen by (and to see) a running QEMU.
 *
 *   setLock(fd, start, length, type) -> 0, or the errno of a failed fcntl
 *   testLock(fd, start, length, type) -> 0 when the lock could be taken, else the type of the
 *                                        conflicting lock held through another open file
 *                                        description; a negative errno when fcntl failed
 * type: 0 = unlock, 1 = read (shared) lock, 2 = write (exclusive) lock. Never blocks.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <node_api.h>

static short lock_type(int32_t type) {
  return type == 1 ? F_RDLCK : type == 2 ? F_WRLCK : F_UNLCK;
}

static int read_args(napi_env env, napi_callback_info info, int32_t *fd, int64_t *start, int64_t *length, int32_t *type) {
  size_t argc = 4;
  napi_value argv[4];
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc != 4) {
    napi_throw_type_error(env, NULL, "expected (fd, start, length, type)");
    return 0;
  }
  if (napi_get_value_int32(env, argv[0], fd) != napi_ok || napi_get_value_int64(env, argv[1], start) != napi_ok ||
      napi_get_value_int64(env, argv[2], length) != napi_ok || napi_get_value_int32(env, argv[3], type) != napi_ok ||
      *fd < 0 || *start < 0 || *length < 0 || *type < 0 || *type > 2) {
    napi_throw_type_error(env, NULL, "expected (fd, start, length, type) as non-negative integers, type 0..2");
    return 0;
  }
  return 1;
}

static napi_value number(napi_env env, int32_t v) {
  napi_value out;
  napi_create_int32(env, v, &out);
  return out;
}

/* Runs fcntl(cmd) on the range the arguments describe; returns -1 with errno set on failure. */
static int ofd_fcntl(napi_env env, napi_callback_info info, int cmd, struct flock *fl, int *ok) {
  int32_t fd, type;
  int64_t start, length;
  *ok = read_args(env, info, &fd, &start, &length, &type);
  if (!*ok) return -1;
  memset(fl, 0, sizeof *fl); /* OFD locks require l_pid == 0 */
  fl->l_type = lock_type(type);
  fl->l_whence = SEEK_SET;
  fl->l_start = start;
  fl->l_len = length;
  int rc;
  do {
    rc = fcntl(fd, cmd, fl);
  } while (rc == -1 && errno == EINTR);
  return rc;
}

static napi_value set_lock(napi_env env, napi_callback_info info) {
  struct flock fl;
  int ok;
  int rc = ofd_fcntl(env, info, F_OFD_SETLK, &fl, &ok);
  if (!ok) return NULL;
  return number(env, rc == -1 ? errno : 0);
}

static napi_value test_lock(napi_env env, napi_callback_info info) {
  struct flock fl;
  int ok;
  int rc = ofd_fcntl(env, info, F_OFD_GETLK, &fl, &ok);
  if (!ok) return NULL;
  if (rc == -1) return number(env, -errno);
  return number(env, fl.l_type == F_UNLCK ? 0 : fl.l_type == F_RDLCK ? 1 : 2);
}

static napi_value init(napi_env env, napi_value exports) {
  napi_property_descriptor props[] = {
    {"setLock", NULL, set_lock, NULL, NULL, NULL, napi_default, NULL},
    {"testLock", NULL, test_lock, NULL, NULL, NULL, napi_default, NULL},
  };
  napi_define_properties(env, exports, sizeof props / sizeof props[0], props);
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, init)
