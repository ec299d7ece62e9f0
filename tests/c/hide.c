/* A filter in C that edits the export list of the layer below: it hides
 * the exports whose names start with hide-prefix=, and when the layer
 * below has no default export of its own, makes the first export it still
 * lists the default.  It reads the layer below's list into a list of its
 * own (exports_new, exports_count, exports_get, exports_free). */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <nbdhost-filter.h>

static char *prefix;
static __thread char default_name[4096];

static int
hide_config (const char *key, const char *value)
{
  if (strcmp (key, "hide-prefix") != 0)
    return NBDHOST_CONFIG_PASS;
  free (prefix);
  prefix = strdup (value);
  return prefix ? NBDHOST_CONFIG_TAKEN : -1;
}

static int
hidden (const char *name)
{
  return prefix && strncmp (name, prefix, strlen (prefix)) == 0;
}

/* Append the visible exports below to out; with first, only the first. */
static int
visible (const struct nbdhost_next_exports *next, int readonly, int is_tls,
         struct nbdhost_exports *out, int first)
{
  struct nbdhost_exports *below = nbdhost_host->exports_new ();
  size_t i, n;
  int r = -1;

  if (below == NULL)
    return -1;
  if (next->list_exports (next, readonly, is_tls, below) == -1)
    goto out;
  n = nbdhost_host->exports_count (below);
  for (i = 0; i < n; i++) {
    const char *name, *description;
    if (nbdhost_host->exports_get (below, i, &name, &description) == -1)
      goto out;
    if (hidden (name))
      continue;
    if (nbdhost_host->add_export (out, name, description) == -1)
      goto out;
    if (first)
      break;
  }
  r = 0;
 out:
  nbdhost_host->exports_free (below);
  return r;
}

static int
hide_list_exports (const struct nbdhost_next_exports *next, int readonly,
                   int is_tls, struct nbdhost_exports *exports)
{
  return visible (next, readonly, is_tls, exports, 0);
}

static const char *
hide_default_export (const struct nbdhost_next_exports *next, int readonly,
                     int is_tls)
{
  const char *below = next->default_export (next, readonly, is_tls);
  struct nbdhost_exports *first;
  const char *name, *description;

  if (below == NULL)
    return NULL;
  if (*below != '\0')
    return below;
  first = nbdhost_host->exports_new ();
  if (first == NULL)
    return NULL;
  if (visible (next, readonly, is_tls, first, 1) == -1 ||
      nbdhost_host->exports_count (first) == 0 ||
      nbdhost_host->exports_get (first, 0, &name, &description) == -1) {
    nbdhost_host->exports_free (first);
    nbdhost_error (ENOENT, "hide: no visible export to make the default");
    return NULL;
  }
  snprintf (default_name, sizeof default_name, "%s", name);
  nbdhost_host->exports_free (first);
  return default_name;
}

static void *
hide_open (const struct nbdhost_next_open *next, int readonly,
           const char *export_name)
{
  if (hidden (export_name)) {
    nbdhost_error (ENOENT, "hide: no export '%s'", export_name);
    return NULL;
  }
  if (next->open (next, readonly, export_name) == -1)
    return NULL;
  return (void *) 1;
}

static void
hide_unload (void)
{
  free (prefix);
}

static struct nbdhost_filter filter = {
  .thread_model = NBDHOST_THREAD_MODEL_PARALLEL,
  .name = "hide",
  .version = "1.0",
  .description = "hide exports by name prefix",
  .config = hide_config,
  .unload = hide_unload,
  .open = hide_open,
  .list_exports = hide_list_exports,
  .default_export = hide_default_export,
};

NBDHOST_REGISTER_FILTER (filter)
