{
  "targets": [
    {
      "target_name": "qcow2fs_codec",
      "sources": ["codec.c"],
      "cflags": ["-Wall", "-Wextra", "-O2"],
      "libraries": ["-lzstd", "-ldeflate", "-lz"]
    }
  ]
}
