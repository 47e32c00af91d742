{
  "targets": [
    {
      "target_name": "qcow2fs_lock",
      "sources": ["ofd_lock.c"],
      "cflags": ["-Wall", "-Wextra", "-O2"]
    }
  ]
}
