/* A plugin with no list_exports whose default_export fails with a
 * message: listing its exports gives an empty list, as nbdkit's does, and
 * the message is logged. */
#include <errno.h>
#include <stddef.h>
#include <nbdhost-plugin.h>

static const struct nbdhost_host *host;

static const char *
n_default_export (int readonly, int is_tls)
{
  (void) readonly; (void) is_tls;
  host->error (ENOENT, "nodefault: no default export here");
  return NULL;
}

static void *n_open (int readonly) { (void) readonly; return (void *) 1; }
static int64_t n_get_size (void *h) { (void) h; return 1 << 20; }

static int
n_pread (void *h, void *buf, uint64_t count, uint64_t offset, uint32_t flags)
{
  (void) h; (void) offset; (void) flags;
  for (uint64_t i = 0; i < count; i++)
    ((char *) buf)[i] = 0;
  return 0;
}

static const struct nbdhost_plugin plugin = {
  .struct_size = sizeof plugin,
  .abi_version = NBDHOST_ABI_VERSION,
  .thread_model = NBDHOST_THREAD_MODEL_PARALLEL,
  .name = "nodefault",
  .default_export = n_default_export,
  .open = n_open,
  .get_size = n_get_size,
  .pread = n_pread,
};

const struct nbdhost_plugin *
nbdhost_plugin_entry (const struct nbdhost_host *h)
{
  host = h;
  return &plugin;
}
