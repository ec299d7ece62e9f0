/* A filter in C for the ABI 1.8 callbacks.  Its export description names
 * the local file the layer below serves (next->local_file), or "none";
 * finalize appends "finalize <size>" to the file finalized= names, asking
 * the layer below for its size to show that it is still open then. */
#include <errno.h>
#include <inttypes.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <nbdhost-filter.h>

static char *finalized;
static __thread char description[4096];

static int
where_config (const char *key, const char *value)
{
  if (strcmp (key, "finalized") != 0)
    return NBDHOST_CONFIG_PASS;
  free (finalized);
  finalized = strdup (value);
  return finalized ? NBDHOST_CONFIG_TAKEN : -1;
}

static void
where_unload (void)
{
  free (finalized);
  finalized = NULL;
}

static const char *
where_export_description (const struct nbdhost_next *next, void *handle)
{
  const char *file = NULL;

  if (next->struct_size >= offsetof (struct nbdhost_next, local_file)
                           + sizeof next->local_file)
    file = next->local_file (next);
  snprintf (description, sizeof description, "local file: %s",
            file ? file : "none");
  return description;
}

static int
where_finalize (const struct nbdhost_next *next, void *handle)
{
  int64_t size = next->get_size (next);
  FILE *f;

  if (finalized == NULL)
    return 0;
  f = fopen (finalized, "a");
  if (f == NULL) {
    nbdhost_error (EIO, "%s: cannot append", finalized);
    return -1;
  }
  fprintf (f, "finalize %" PRId64 "\n", size);
  fclose (f);
  return 0;
}

static struct nbdhost_filter filter = {
  .name = "where",
  .version = "1.0",
  .description = "name the local file below; note each finalize",
  .thread_model = NBDHOST_THREAD_MODEL_PARALLEL,
  .unload = where_unload,
  .config = where_config,
  .export_description = where_export_description,
  .finalize = where_finalize,
};

NBDHOST_REGISTER_FILTER (filter)
