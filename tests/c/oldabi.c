/* A plugin built against an older, shorter struct: it ends after pread.
 * The server must treat every later callback as absent (so the export is
 * read-only) and serve the byte (offset & 0xff) at every offset. */
#include <stddef.h>
#include <nbdhost-plugin.h>

struct old_plugin {
  uint64_t struct_size;
  uint32_t abi_version;
  uint32_t thread_model;
  const char *name, *version, *description, *config_help, *magic_config_key;
  void *load, *unload, *config, *config_complete, *get_ready, *preconnect;
  void *list_exports, *default_export;
  void *(*open) (int readonly);
  void *close;
  int64_t (*get_size) (void *handle);
  void *block_size, *can_write, *can_flush, *can_trim, *can_zero;
  void *can_fast_zero, *can_fua, *can_multi_conn, *can_cache, *can_extents;
  void *is_rotational, *export_description;
  int (*pread) (void *handle, void *buf, uint64_t count, uint64_t offset,
                uint32_t flags);
};

static void *old_open (int readonly) { (void) readonly; return (void *) 1; }
static int64_t old_get_size (void *h) { (void) h; return 1 << 20; }

static int
old_pread (void *h, void *buf, uint64_t count, uint64_t offset,
           uint32_t flags)
{
  unsigned char *p = buf;
  (void) h; (void) flags;
  for (uint64_t i = 0; i < count; i++)
    p[i] = (offset + i) & 0xff;
  return 0;
}

static const struct old_plugin plugin = {
  .struct_size = sizeof plugin,
  .abi_version = NBDHOST_ABI_MAJOR << 16,
  .thread_model = NBDHOST_THREAD_MODEL_PARALLEL,
  .name = "oldabi",
  .open = old_open,
  .get_size = old_get_size,
  .pread = old_pread,
};

const void *
nbdhost_plugin_entry (const struct nbdhost_host *host)
{
  (void) host;
  return &plugin;
}
