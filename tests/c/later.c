/* A filter in C for the ABI 1.10 services of struct nbdhost_next.
 *
 * - Reads wait delay_ms= milliseconds on next->after, holding no thread,
 *   and then go down with next->async_pread.
 * - A flush first reopens the layer below (next->reopen).
 * - prepare starts a background job (next->background) that reads the
 *   first 16 bytes of the layer below, then waits for next->closing.
 *   The export description is what it read.  prepare also sets an hour's
 *   timer for no request, which only the close (or a shutdown) ends.
 * - Events are appended to record=: "reopen", "job end", "timer ..." and
 *   "close", so a test sees what the close waited for and cancelled. */
#include <errno.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <nbdhost-filter.h>

static char *record;
static uint64_t delay_ns;

struct handle {
  char first[17];
  volatile int have_first;
};

struct delayed {
  const struct nbdhost_next *next;
  void *buf;
  uint64_t count, offset;
  uint32_t flags;
  struct nbdhost_request *req;
};

static void
note (const char *what)
{
  FILE *f;

  if (record == NULL)
    return;
  f = fopen (record, "a");
  if (f) {
    fprintf (f, "%s\n", what);
    fclose (f);
  }
}

static int
later_config (const char *key, const char *value)
{
  if (strcmp (key, "record") == 0) {
    free (record);
    record = strdup (value);
    return record ? NBDHOST_CONFIG_TAKEN : -1;
  }
  if (strcmp (key, "delay_ms") == 0) {
    delay_ns = strtoull (value, NULL, 10) * 1000000;
    return NBDHOST_CONFIG_TAKEN;
  }
  return NBDHOST_CONFIG_PASS;
}

static void
later_unload (void)
{
  free (record);
  record = NULL;
}

static void *
later_open (const struct nbdhost_next_open *next, int readonly,
            const char *export_name)
{
  struct handle *h;

  if (next->open (next, readonly, export_name) == -1)
    return NULL;
  h = calloc (1, sizeof *h);
  if (h == NULL)
    nbdhost_error (ENOMEM, "calloc");
  return h;
}

static void
later_close (void *handle)
{
  note ("close");
  free (handle);
}

static void
job (const struct nbdhost_next *next, void *data)
{
  struct handle *h = data;

  if (next->pread (next, h->first, 16, 0, 0) == 0)
    h->have_first = 1;
  while (!next->closing (next))
    nbdhost_host->nanosleep (0, 5000000);
  note ("job end");
}

static void
linger (void *data, int errnum)
{
  note (errnum == ECANCELED ? "timer ECANCELED"
        : errnum == ESHUTDOWN ? "timer ESHUTDOWN" : "timer fired");
}

static int
later_prepare (const struct nbdhost_next *next, void *handle, int readonly)
{
  if (next->after (next, 3600 * UINT64_C (1000000000), linger, NULL) == -1)
    return -1;
  return next->background (next, job, handle);
}

static const char *
later_export_description (const struct nbdhost_next *next, void *handle)
{
  struct handle *h = handle;
  int i;

  for (i = 0; i < 200 && !h->have_first; i++)
    nbdhost_host->nanosleep (0, 5000000);
  return h->have_first ? h->first : "no job";
}

static void
fire (void *data, int errnum)
{
  struct delayed *d = data;

  if (errnum != 0)
    nbdhost_host->complete (d->req, errnum, "timer cancelled");
  else
    d->next->async_pread (d->next, d->buf, d->count, d->offset, d->flags,
                          d->req);
  free (d);
}

static void
later_async_pread (const struct nbdhost_next *next, void *handle,
                   void *buf, uint64_t count, uint64_t offset,
                   uint32_t flags, struct nbdhost_request *req)
{
  struct delayed *d = malloc (sizeof *d);

  if (d == NULL) {
    nbdhost_host->complete (req, ENOMEM, "malloc");
    return;
  }
  *d = (struct delayed) { next, buf, count, offset, flags, req };
  if (next->after (next, delay_ns, fire, d) == -1) {
    nbdhost_host->complete (req, nbdhost_host->last_errno (), "after");
    free (d);
  }
}

static int
later_flush (const struct nbdhost_next *next, void *handle, uint32_t flags)
{
  if (next->reopen (next, 0) == -1)
    return -1;
  note ("reopen");
  return next->flush (next, flags);
}


static struct nbdhost_filter filter = {
  .name = "later",
  .version = "1.0",
  .description = "delay reads on a timer, reopen on flush, read in the "
                 "background",
  .thread_model = NBDHOST_THREAD_MODEL_PARALLEL,
  .unload = later_unload,
  .config = later_config,
  .open = later_open,
  .close = later_close,
  .prepare = later_prepare,
  .export_description = later_export_description,
  .flush = later_flush,
  .async_pread = later_async_pread,
};

NBDHOST_REGISTER_FILTER (filter)
