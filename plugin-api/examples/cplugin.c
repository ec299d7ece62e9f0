/* cmem: a RAM disk, written in C against nbdhost-plugin.h alone.
 *
 * It shows that a third-party C plugin needs nothing from nbdhost but the
 * header: no library to link, no symbols from the server.  Every host
 * service arrives through the table passed to nbdhost_plugin_entry, which
 * NBDHOST_REGISTER_PLUGIN defines; nbdhost_error and nbdhost_debug format
 * messages for it.
 *
 * Build, against an installed nbdhost:
 *
 *   cc $(pkg-config --cflags nbdhost) -shared -fPIC -Wall -Werror -o libcmemplugin.so cplugin.c
 *
 * or from the top of the source tree:
 *
 *   cc -shared -fPIC -Wall -Werror -I plugin-api/include -o libcmemplugin.so plugin-api/examples/cplugin.c
 *
 * Run:
 *
 *   nbdhost ./libcmemplugin.so size=64M     # or just: ... 64M
 *
 * The disk starts zeroed and lives as long as the server; every
 * connection sees the same bytes.
 */

#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "nbdhost-plugin.h"

#define DEFAULT_SIZE (UINT64_C (1) << 20) /* 1 MiB */

static uint64_t size = DEFAULT_SIZE;
static unsigned char *disk;
/* The thread model is PARALLEL: this lock makes each request atomic with
 * respect to the others. */
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;

/* Per-connection state; the disk itself is shared. */
struct cmem_handle {
  int readonly;
};

/* Is [offset, offset+count) inside the disk?  Records EINVAL if not. */
static int
check_range (const char *what, uint64_t count, uint64_t offset)
{
  if (offset > size || count > size - offset) {
    nbdhost_error (EINVAL, "%s out of range: %" PRIu64 " bytes at offset %" PRIu64
            " on a disk of %" PRIu64 " bytes", what, count, offset, size);
    return -1;
  }
  return 0;
}

static int
cmem_load (void)
{
  nbdhost_debug ("cmem: loaded");
  return 0;
}

static void
cmem_unload (void)
{
  free (disk);
  disk = NULL;
  size = DEFAULT_SIZE;
}

static int
cmem_config (const char *key, const char *value)
{
  if (strcmp (key, "size") == 0) {
    int64_t r = nbdhost_host->parse_size (value);
    if (r == -1)
      return -1;                /* parse_size recorded the error */
    size = (uint64_t) r;
    return 0;
  }
  nbdhost_error (EINVAL, "unknown parameter '%s'", key);
  return -1;
}

static int
cmem_config_complete (void)
{
  if (size > SIZE_MAX) {
    nbdhost_error (EINVAL, "size %" PRIu64 " is too large for this machine", size);
    return -1;
  }
  /* calloc(0, 1) may return NULL; allocate at least one byte. */
  disk = calloc (size ? (size_t) size : 1, 1);
  if (disk == NULL) {
    nbdhost_error (ENOMEM, "cannot allocate %" PRIu64 " bytes", size);
    return -1;
  }
  return 0;
}

static void *
cmem_open (int readonly)
{
  struct cmem_handle *h = malloc (sizeof *h);

  if (h == NULL) {
    nbdhost_error (ENOMEM, "out of memory");
    return NULL;
  }
  h->readonly = readonly;
  return h;
}

static void
cmem_close (void *handle)
{
  free (handle);
}

static int64_t
cmem_get_size (void *handle)
{
  (void) handle;
  return (int64_t) size;
}

static int
cmem_can_write (void *handle)
{
  struct cmem_handle *h = handle;

  return !h->readonly;
}

static int
cmem_can_flush (void *handle)
{
  (void) handle;
  return 1;
}

static int
cmem_can_trim (void *handle)
{
  (void) handle;
  return 1;
}

static int
cmem_pread (void *handle, void *buf, uint64_t count, uint64_t offset,
            uint32_t flags)
{
  (void) handle;
  (void) flags;
  if (check_range ("read", count, offset) == -1)
    return -1;
  pthread_mutex_lock (&lock);
  memcpy (buf, disk + offset, count);
  pthread_mutex_unlock (&lock);
  return 0;
}

static int
cmem_pwrite (void *handle, const void *buf, uint64_t count, uint64_t offset,
             uint32_t flags)
{
  (void) handle;
  /* NBDHOST_FLAG_FUA needs nothing: memory is as persistent as it gets. */
  (void) flags;
  if (check_range ("write", count, offset) == -1)
    return -1;
  pthread_mutex_lock (&lock);
  memcpy (disk + offset, buf, count);
  pthread_mutex_unlock (&lock);
  return 0;
}

static int
cmem_flush (void *handle, uint32_t flags)
{
  (void) handle;
  (void) flags;
  return 0;
}

static int
cmem_trim (void *handle, uint64_t count, uint64_t offset, uint32_t flags)
{
  (void) handle;
  (void) flags;
  if (check_range ("trim", count, offset) == -1)
    return -1;
  pthread_mutex_lock (&lock);
  memset (disk + offset, 0, count);
  pthread_mutex_unlock (&lock);
  return 0;
}

/* struct_size and abi_version are filled by NBDHOST_REGISTER_PLUGIN. */
static struct nbdhost_plugin plugin = {
  .thread_model = NBDHOST_THREAD_MODEL_PARALLEL,
  .name = "cmem",
  .version = "1.0",
  .description = "RAM disk written in C",
  .config_help = "size=<SIZE>  Size of the disk (default 1M).",
  .magic_config_key = "size",
  .load = cmem_load,
  .unload = cmem_unload,
  .config = cmem_config,
  .config_complete = cmem_config_complete,
  .open = cmem_open,
  .close = cmem_close,
  .get_size = cmem_get_size,
  .can_write = cmem_can_write,
  .can_flush = cmem_can_flush,
  .can_trim = cmem_can_trim,
  .pread = cmem_pread,
  .pwrite = cmem_pwrite,
  .flush = cmem_flush,
  .trim = cmem_trim,
};

/* Every host service this plugin calls (error, debug, parse_size) is in
 * ABI 1.0, so any server of major version 1 has them. */
NBDHOST_REGISTER_PLUGIN (plugin)
