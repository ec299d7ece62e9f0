/* future: a plugin built for a later major version of the ABI.
 *
 * Its abi_version carries major NBDHOST_ABI_MAJOR + 1, so this server must
 * refuse to load it, with a message naming the ABI mismatch, before it
 * calls any callback or reads past abi_version.  If a server wrongly
 * accepted it, it would serve an empty 1 MiB disk.
 *
 * Build (from the top of the source tree):
 *
 *   cc -shared -fPIC -Wall -Werror -I plugin-api/include -o libfutureplugin.so plugin-api/examples/cplugin-future.c
 */

#include <stdint.h>
#include <string.h>

#include "nbdhost-plugin.h"

#define FUTURE_ABI_VERSION (((NBDHOST_ABI_MAJOR + 1) << 16) | 0)

static int handle;

static void *
future_open (int readonly)
{
  (void) readonly;
  return &handle;
}

static int64_t
future_get_size (void *h)
{
  (void) h;
  return 1 << 20;
}

static int
future_pread (void *h, void *buf, uint64_t count, uint64_t offset,
              uint32_t flags)
{
  (void) h;
  (void) offset;
  (void) flags;
  memset (buf, 0, count);
  return 0;
}

static const struct nbdhost_plugin plugin = {
  .struct_size = sizeof (struct nbdhost_plugin),
  .abi_version = FUTURE_ABI_VERSION,
  .thread_model = NBDHOST_THREAD_MODEL_PARALLEL,
  .name = "future",
  .version = "1.0",
  .description = "a plugin for a future major ABI, to be refused",
  .open = future_open,
  .get_size = future_get_size,
  .pread = future_pread,
};

const struct nbdhost_plugin *nbdhost_plugin_entry (const struct nbdhost_host *);

const struct nbdhost_plugin *
nbdhost_plugin_entry (const struct nbdhost_host *h)
{
  (void) h;
  return &plugin;
}
