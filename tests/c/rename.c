/* A filter that opens the layer below under another export name,
 * "below-" and the client's, and whose export description says which
 * name the filter itself sees ("filter=NAME"). */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <nbdhost-filter.h>

static __thread char description[4096];

static void *
rename_open (const struct nbdhost_next_open *next, int readonly,
             const char *export_name)
{
  char below[4096];

  snprintf (below, sizeof below, "below-%s", export_name);
  if (next->open (next, readonly, below) == -1)
    return NULL;
  return (void *) 1;
}

static const char *
rename_export_description (const struct nbdhost_next *next, void *handle)
{
  const char *name = nbdhost_host->export_name ();

  snprintf (description, sizeof description, "filter=%s",
            name ? name : "(null)");
  return description;
}

static struct nbdhost_filter filter = {
  .thread_model = NBDHOST_THREAD_MODEL_PARALLEL,
  .name = "rename",
  .version = "1.0",
  .description = "open the layer below as below-NAME",
  .open = rename_open,
  .export_description = rename_export_description,
};

NBDHOST_REGISTER_FILTER (filter)
