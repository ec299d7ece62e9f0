/* A plugin whose reads fail without recording an error, as a careless C
 * plugin might: the server must still answer with EIO. */
#include <nbdhost-plugin.h>

static void *s_open (int readonly) { (void) readonly; return (void *) 1; }
static int64_t s_get_size (void *h) { (void) h; return 1 << 20; }

static int
s_pread (void *h, void *buf, uint64_t count, uint64_t offset, uint32_t flags)
{
  (void) h; (void) buf; (void) count; (void) offset; (void) flags;
  return -1;
}

static const struct nbdhost_plugin plugin = {
  .struct_size = sizeof plugin,
  .abi_version = NBDHOST_ABI_VERSION,
  .thread_model = NBDHOST_THREAD_MODEL_PARALLEL,
  .name = "silent",
  .open = s_open,
  .get_size = s_get_size,
  .pread = s_pread,
};

const struct nbdhost_plugin *
nbdhost_plugin_entry (const struct nbdhost_host *h)
{
  (void) h;
  return &plugin;
}
