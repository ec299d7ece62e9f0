/* An nbdkit plugin, written against nbdkit's own <nbdkit-plugin.h> and
 * nothing of nbdhost's, that uses one of each feature of nbdkit's plugin
 * API that a client or the log can observe, so tests can show that the
 * adapter serves it as nbdkit would.  A 1 MiB disk in memory.
 *
 * Build:
 *   cc -shared -fPIC [-DNBDKIT_API_VERSION=2] [-DOLD_STRUCT] nbdkit-features.c
 *
 * NBDKIT_API_VERSION is 1 (nbdkit's default) or 2; the data callbacks
 * take flags only in 2.  OLD_STRUCT registers the struct as a plugin
 * built against an older nbdkit would: ending before magic_config_key,
 * so every field set below past that point must be ignored.
 *
 * Parameters:
 *   dir=DIR            (the magic key) where the markers below go
 *   serial=true|false  make the thread_model callback ask that each
 *                      connection's requests be serialized
 *
 * Markers written in DIR:
 *   after_fork         by after_fork: the process id it ran in (then
 *                      after_fork waits 200 ms)
 *   cleanup            by cleanup
 *   max_in_flight      by cleanup: the most preads that were ever inside
 *                      the plugin at once (each takes 20 ms)
 *
 * get_ready logs "answer=N" with nbdkit_debug, N being the variable that
 * -D features.answer=N sets.  A read covering FAIL_OFFSET (768 KiB) fails
 * with ENOSPC (errno, which the plugin declares preserved) and an
 * nbdkit_error message.
 */

#include <errno.h>
#include <inttypes.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <nbdkit-plugin.h>

#define THREAD_MODEL NBDKIT_THREAD_MODEL_PARALLEL

#define DISK_SIZE (1024 * 1024)
#define FAIL_OFFSET (768 * 1024)

#if NBDKIT_API_VERSION == 1
#define FLAGS_PARAM
#else
#define FLAGS_PARAM , uint32_t flags __attribute__ ((unused))
#endif

/* -D features.answer=N: nbdkit finds it by name. */
NBDKIT_DLL_PUBLIC int features_debug_answer;

static char *dir;
static int serial;
static unsigned char disk[DISK_SIZE];
static int in_flight, max_in_flight;

static void
marker (const char *name, const char *content)
{
  char path[4096], tmp[4096];
  FILE *f;

  /* Written aside and renamed, so that a test never reads a marker that
   * exists but is still empty. */
  snprintf (path, sizeof path, "%s/%s", dir, name);
  snprintf (tmp, sizeof tmp, "%s/.%s.tmp", dir, name);
  f = fopen (tmp, "w");
  if (f == NULL) {
    nbdkit_error ("%s: %m", tmp);
    return;
  }
  fputs (content, f);
  fclose (f);
  if (rename (tmp, path) == -1)
    nbdkit_error ("%s: %m", path);
}

static void
features_unload (void)
{
  free (dir);
}

static int
features_config (const char *key, const char *value)
{
  if (strcmp (key, "dir") == 0) {
    free (dir);
    dir = nbdkit_realpath (value);
    return dir == NULL ? -1 : 0;
  }
  if (strcmp (key, "serial") == 0) {
    serial = nbdkit_parse_bool (value);
    return serial == -1 ? -1 : 0;
  }
  nbdkit_error ("unknown parameter '%s'", key);
  return -1;
}

static int
features_config_complete (void)
{
  if (dir == NULL) {
    nbdkit_error ("dir= is required");
    return -1;
  }
  return 0;
}

static int
features_thread_model (void)
{
  return serial ? NBDKIT_THREAD_MODEL_SERIALIZE_REQUESTS
                : NBDKIT_THREAD_MODEL_PARALLEL;
}

static int
features_get_ready (void)
{
  nbdkit_debug ("answer=%d", features_debug_answer);
  return 0;
}

static int
features_after_fork (void)
{
  char pid[32];

  snprintf (pid, sizeof pid, "%ld\n", (long) getpid ());
  marker ("after_fork", pid);
  /* A test that signals the server as soon as this marker appears then
   * signals it inside this call, before the server serves: the signal
   * must still end in an orderly shutdown, with cleanup. */
  usleep (200000);
  return 0;
}

static void
features_cleanup (void)
{
  char n[32];

  snprintf (n, sizeof n, "%d\n", __atomic_load_n (&max_in_flight,
                                                  __ATOMIC_SEQ_CST));
  marker ("max_in_flight", n);
  marker ("cleanup", "");
}

static void
features_dump_plugin (void)
{
  printf ("features_dump=yes\n");
  fflush (stdout);
}

static int
features_list_exports (int readonly, int is_tls,
                       struct nbdkit_exports *exports)
{
  if (nbdkit_add_export (exports, "a", "the first export") == -1 ||
      nbdkit_add_export (exports, "b", "the second export") == -1)
    return -1;
  return 0;
}

static const char *
features_default_export (int readonly, int is_tls)
{
  return "a";
}

static void *
features_open (int readonly)
{
  return disk;
}

static const char *
features_export_description (void *handle)
{
  return nbdkit_printf_intern ("export %s, tls=%d",
                               nbdkit_export_name (), nbdkit_is_tls ());
}

static int64_t
features_get_size (void *handle)
{
  return DISK_SIZE;
}

static int
features_block_size (void *handle,
                     uint32_t *minimum, uint32_t *preferred,
                     uint32_t *maximum)
{
  *minimum = 512;
  *preferred = 4096;
  *maximum = 1024 * 1024;
  return 0;
}

static int
features_pread (void *handle, void *buf, uint32_t count, uint64_t offset
                FLAGS_PARAM)
{
  int now = __atomic_add_fetch (&in_flight, 1, __ATOMIC_SEQ_CST);
  int seen = __atomic_load_n (&max_in_flight, __ATOMIC_SEQ_CST);

  while (now > seen &&
         !__atomic_compare_exchange_n (&max_in_flight, &seen, now, 0,
                                       __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST))
    ;
  usleep (20000);
  __atomic_sub_fetch (&in_flight, 1, __ATOMIC_SEQ_CST);

  if (offset <= FAIL_OFFSET && FAIL_OFFSET < offset + count) {
    /* As a plugin whose system call failed: errno first, then a message
     * that expands it; nbdkit_error must leave errno alone.
     */
    errno = ENOSPC;
    nbdkit_error ("features: read at %" PRIu64 " failed: %m", offset);
    return -1;
  }
  memcpy (buf, disk + offset, count);
  return 0;
}

static int
features_pwrite (void *handle, const void *buf, uint32_t count,
                 uint64_t offset FLAGS_PARAM)
{
  memcpy (disk + offset, buf, count);
  return 0;
}

static struct nbdkit_plugin plugin = {
  .name = "features",
  .longname = "nbdkit features test plugin",
  .version = "1.2.3",
  .description = "A plugin that uses one of each nbdkit feature.\n"
                 "For nbdhost's tests.",
  .unload = features_unload,
  .config = features_config,
  .config_complete = features_config_complete,
  .config_help =
    "dir=<DIR>          (required) Directory for the marker files.\n"
    "serial=true|false  Serialize each connection's requests.",
  .magic_config_key = "dir",
  .thread_model = features_thread_model,
  .get_ready = features_get_ready,
  .after_fork = features_after_fork,
  .cleanup = features_cleanup,
  .dump_plugin = features_dump_plugin,
  .list_exports = features_list_exports,
  .default_export = features_default_export,
  .open = features_open,
  .export_description = features_export_description,
  .get_size = features_get_size,
  .block_size = features_block_size,
  .pread = features_pread,
  .pwrite = features_pwrite,
  .errno_is_preserved = 1,
};

#ifdef OLD_STRUCT
/* What NBDKIT_REGISTER_PLUGIN expands to, but with the size of the struct
 * of an nbdkit from before magic_config_key existed.
 */
NBDKIT_DLL_PUBLIC struct nbdkit_plugin *
plugin_init (void)
{
  plugin._struct_size = offsetof (struct nbdkit_plugin, magic_config_key);
  plugin._api_version = NBDKIT_API_VERSION;
  plugin._thread_model = THREAD_MODEL;
  return &plugin;
}
#else
NBDKIT_REGISTER_PLUGIN (plugin)
#endif
