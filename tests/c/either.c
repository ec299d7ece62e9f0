/* A RAM disk that can serve either way: synchronous pread and pwrite, and
 * asynchronous ones completed in the starting call.  With sync=1 its
 * capabilities say NBDHOST_SYNCHRONOUS, and the server must not use the
 * asynchronous ones.  The export description counts the calls of each
 * kind so far: "sync N async M". */
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <nbdhost-plugin.h>

#define SIZE (1 << 20)

static char disk[SIZE];
static int sync_only;
static atomic_long sync_calls, async_calls;
static char description[64];

static int
either_config (const char *key, const char *value)
{
  if (strcmp (key, "sync") != 0) {
    nbdhost_error (EINVAL, "unknown parameter %s", key);
    return -1;
  }
  sync_only = atoi (value);
  return 0;
}

static uint64_t
either_capabilities (void)
{
  return sync_only ? NBDHOST_SYNCHRONOUS : 0;
}

static void *
either_open (int readonly)
{
  return disk;
}

static int64_t
either_get_size (void *handle)
{
  return SIZE;
}

static const char *
either_export_description (void *handle)
{
  snprintf (description, sizeof description, "sync %ld async %ld",
            atomic_load (&sync_calls), atomic_load (&async_calls));
  return description;
}

static int
either_pread (void *handle, void *buf, uint64_t count, uint64_t offset,
              uint32_t flags)
{
  atomic_fetch_add (&sync_calls, 1);
  memcpy (buf, disk + offset, count);
  return 0;
}

static int
either_pwrite (void *handle, const void *buf, uint64_t count,
               uint64_t offset, uint32_t flags)
{
  atomic_fetch_add (&sync_calls, 1);
  memcpy (disk + offset, buf, count);
  return 0;
}

static void
either_async_pread (void *handle, void *buf, uint64_t count, uint64_t offset,
                    uint32_t flags, struct nbdhost_request *req)
{
  atomic_fetch_add (&async_calls, 1);
  memcpy (buf, disk + offset, count);
  nbdhost_host->complete (req, 0, NULL);
}

static void
either_async_pwrite (void *handle, const void *buf, uint64_t count,
                     uint64_t offset, uint32_t flags,
                     struct nbdhost_request *req)
{
  atomic_fetch_add (&async_calls, 1);
  memcpy (disk + offset, buf, count);
  nbdhost_host->complete (req, 0, NULL);
}

static struct nbdhost_plugin plugin = {
  .name = "either",
  .version = "1",
  .thread_model = NBDHOST_THREAD_MODEL_PARALLEL,
  .config = either_config,
  .capabilities = either_capabilities,
  .open = either_open,
  .get_size = either_get_size,
  .export_description = either_export_description,
  .pread = either_pread,
  .pwrite = either_pwrite,
  .async_pread = either_async_pread,
  .async_pwrite = either_async_pwrite,
};

NBDHOST_REGISTER_PLUGIN (plugin)
