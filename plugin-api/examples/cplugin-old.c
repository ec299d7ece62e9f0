/* oldabi: a plugin built against an older, shorter struct nbdhost_plugin.
 *
 * Its struct is the header's struct nbdhost_plugin cut off after pread, as
 * a plugin compiled against an earlier header would have it.  The server
 * must read nothing past struct_size and treat every later callback
 * (pwrite, flush, trim, zero, extents, cache) as absent, so the disk is
 * read-only.  Byte o of the 1 MiB disk is (o & 0xff).
 *
 * Build (from the top of the source tree):
 *
 *   cc -shared -fPIC -Wall -Werror -I plugin-api/include -o liboldabiplugin.so plugin-api/examples/cplugin-old.c
 */

#include <errno.h>
#include <stddef.h>
#include <stdint.h>

#include "nbdhost-plugin.h"

#define DISK_SIZE (UINT64_C (1) << 20)

/* struct nbdhost_plugin as it was, up to and including pread. */
struct old_nbdhost_plugin {
  uint64_t struct_size;
  uint32_t abi_version;
  uint32_t thread_model;

  const char *name;
  const char *version;
  const char *description;
  const char *config_help;
  const char *magic_config_key;

  int (*load) (void);
  void (*unload) (void);
  int (*config) (const char *key, const char *value);
  int (*config_complete) (void);
  int (*get_ready) (void);
  int (*preconnect) (int readonly);
  int (*list_exports) (int readonly, int is_tls,
                       struct nbdhost_exports *exports);
  const char *(*default_export) (int readonly, int is_tls);

  void *(*open) (int readonly);
  void (*close) (void *handle);

  int64_t (*get_size) (void *handle);
  int (*block_size) (void *handle,
                     uint32_t *minimum, uint32_t *preferred, uint32_t *maximum);
  int (*can_write) (void *handle);
  int (*can_flush) (void *handle);
  int (*can_trim) (void *handle);
  int (*can_zero) (void *handle);
  int (*can_fast_zero) (void *handle);
  int (*can_fua) (void *handle);
  int (*can_multi_conn) (void *handle);
  int (*can_cache) (void *handle);
  int (*can_extents) (void *handle);
  int (*is_rotational) (void *handle);
  const char *(*export_description) (void *handle);

  int (*pread) (void *handle, void *buf, uint64_t count, uint64_t offset,
                uint32_t flags);
};

/* The prefix really is the current struct's prefix. */
_Static_assert (offsetof (struct old_nbdhost_plugin, pread) ==
                offsetof (struct nbdhost_plugin, pread),
                "old struct is a prefix of struct nbdhost_plugin");
_Static_assert (sizeof (struct old_nbdhost_plugin) ==
                offsetof (struct nbdhost_plugin, pwrite),
                "old struct ends where pwrite begins");

static const struct nbdhost_host *host;

/* Any non-NULL pointer will do as the handle: there is no state. */
static int handle;

static void *
old_open (int readonly)
{
  (void) readonly;
  return &handle;
}

static int64_t
old_get_size (void *h)
{
  (void) h;
  return (int64_t) DISK_SIZE;
}

static int
old_pread (void *h, void *buf, uint64_t count, uint64_t offset,
           uint32_t flags)
{
  unsigned char *p = buf;
  uint64_t i;

  (void) h;
  (void) flags;
  if (offset > DISK_SIZE || count > DISK_SIZE - offset) {
    host->error (EINVAL, "read out of range");
    return -1;
  }
  for (i = 0; i < count; i++)
    p[i] = (unsigned char) ((offset + i) & 0xff);
  return 0;
}

/* No can_write: the server works out from the missing pwrite that the
 * disk is read-only. */
static const struct old_nbdhost_plugin plugin = {
  .struct_size = sizeof (struct old_nbdhost_plugin),
  .abi_version = NBDHOST_ABI_VERSION,
  .thread_model = NBDHOST_THREAD_MODEL_PARALLEL,
  .name = "oldabi",
  .version = "1.0",
  .description = "read-only 1 MiB disk with an older, shorter plugin struct",
  .open = old_open,
  .get_size = old_get_size,
  .pread = old_pread,
};

const struct nbdhost_plugin *nbdhost_plugin_entry (const struct nbdhost_host *);

const struct nbdhost_plugin *
nbdhost_plugin_entry (const struct nbdhost_host *h)
{
  host = h;
  /* The server reads only struct_size bytes through this pointer. */
  return (const struct nbdhost_plugin *) &plugin;
}
