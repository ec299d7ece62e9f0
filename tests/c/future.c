/* A plugin from a future major ABI: the server must refuse it. */
#include <nbdhost-plugin.h>

static const struct nbdhost_plugin plugin = {
  .struct_size = sizeof plugin + 64,
  .abi_version = (NBDHOST_ABI_MAJOR + 1) << 16,
  .name = "future",
};

const struct nbdhost_plugin *
nbdhost_plugin_entry (const struct nbdhost_host *host)
{
  (void) host;
  return &plugin;
}
