/* A filter in C: every byte is stored inverted below it, so reads through
 * the filter see what was written, and the layer below sees ~data.
 * Registered with NBDHOST_REGISTER_FILTER; errors through nbdhost_error. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <nbdhost-filter.h>

static void *
inv_open (const struct nbdhost_next_open *next, int readonly,
          const char *export_name)
{
  if (next->open (next, readonly, export_name) == -1)
    return NULL;
  return (void *) 1;
}

static void
invert (unsigned char *p, uint64_t n)
{
  for (uint64_t i = 0; i < n; i++)
    p[i] = ~p[i];
}

static int
inv_pread (const struct nbdhost_next *next, void *handle, void *buf,
           uint64_t count, uint64_t offset, uint32_t flags)
{
  (void) handle;
  if (next->pread (next, buf, count, offset, flags) == -1)
    return -1;
  invert (buf, count);
  return 0;
}

static int
inv_pwrite (const struct nbdhost_next *next, void *handle, const void *buf,
            uint64_t count, uint64_t offset, uint32_t flags)
{
  unsigned char *copy = malloc (count);
  int r;
  (void) handle;
  if (copy == NULL) {
    nbdhost_error (ENOMEM, "invert: no memory for %llu bytes",
                   (unsigned long long) count);
    return -1;
  }
  memcpy (copy, buf, count);
  invert (copy, count);
  r = next->pwrite (next, copy, count, offset, flags);
  free (copy);
  return r;
}

/* Zeroes below would read as 0xff through the filter: refuse them, and
 * the server writes zeroes through the filter instead (stored as 0xff). */
static int
inv_can_zero (const struct nbdhost_next *next, void *handle)
{
  (void) next; (void) handle;
  return 1;
}

static int
inv_zero (const struct nbdhost_next *next, void *handle, uint64_t count,
          uint64_t offset, uint32_t flags)
{
  (void) next; (void) handle; (void) count; (void) offset; (void) flags;
  nbdhost_host->error (ENOTSUP, NULL);
  return -1;
}

static int
inv_can_trim (const struct nbdhost_next *next, void *handle)
{
  (void) next; (void) handle;
  return 0;
}

static struct nbdhost_filter filter = {
  .thread_model = NBDHOST_THREAD_MODEL_PARALLEL,
  .name = "invert",
  .version = "1.0",
  .description = "store every byte inverted",
  .open = inv_open,
  .pread = inv_pread,
  .pwrite = inv_pwrite,
  .can_zero = inv_can_zero,
  .zero = inv_zero,
  .can_trim = inv_can_trim,
};

NBDHOST_REGISTER_FILTER (filter)
