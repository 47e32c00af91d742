{
  "targets": [
    {
      "target_name": "qcow2fs_lock",
      "sources": ["ofd_lock.c"],
      "cflags": ["-Wall", "-Wextra", "-O2"]
    },
    {
      "target_name": "qcow2fs_io",
      "sources": ["pread_nowait.c"],
      "cflags": ["-Wall", "-Wextra", "-O2"]
    }
  ]
}
