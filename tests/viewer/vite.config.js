import { defineConfig } from "vite";

// The settings Neuroglancer's examples give vite, cut to the one data source the tests use.
export default defineConfig({
  base: "",
  resolve: {
    conditions: [
      "neuroglancer/datasource:none_by_default",
      "neuroglancer/datasource/precomputed:enabled",
    ],
  },
  worker: { format: "es" },
  build: { chunkSizeWarningLimit: 4 * 1024 * 1024 },
});
