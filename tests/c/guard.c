/* A filter in C that looks at the layer below before serving a handle:
 * its prepare callback refuses an export smaller than guard-min= bytes.
 * Open cannot do this, as the layer below is not complete until open
 * returns. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <nbdhost-filter.h>

static int64_t minimum;

static int
guard_config (const char *key, const char *value)
{
  if (strcmp (key, "guard-min") != 0)
    return NBDHOST_CONFIG_PASS;
  minimum = nbdhost_host->parse_size (value);
  return minimum < 0 ? -1 : NBDHOST_CONFIG_TAKEN;
}

static void *
guard_open (const struct nbdhost_next_open *next, int readonly,
            const char *export_name)
{
  if (next->open (next, readonly, export_name) == -1)
    return NULL;
  return (void *) 1;
}

static int
guard_prepare (const struct nbdhost_next *next, void *handle, int readonly)
{
  int64_t size = next->get_size (next);
  (void) handle;
  if (size == -1)
    return -1;
  if (size < minimum) {
    nbdhost_error (EINVAL, "guard: the export has %lld bytes, fewer than %lld%s",
                   (long long) size, (long long) minimum,
                   readonly ? " (read-only)" : "");
    return -1;
  }
  return 0;
}

static struct nbdhost_filter filter = {
  .thread_model = NBDHOST_THREAD_MODEL_PARALLEL,
  .name = "guard",
  .version = "1.0",
  .description = "refuse exports below a size",
  .config = guard_config,
  .open = guard_open,
  .prepare = guard_prepare,
};

NBDHOST_REGISTER_FILTER (filter)
