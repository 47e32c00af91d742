import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    testTimeout: 120_000,
    hookTimeout: 120_000,
    // Mount tests use FUSE and loop devices; a few files in parallel keep the 2-core machine busy, not thrashing.
    maxWorkers: 2,
    minWorkers: 1,
    reporters: ['default'],
  },
});
