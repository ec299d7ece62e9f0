/* A plugin that fails any read made while another call is inside it, and
 * complains on stderr of an open or close made while another call is
 * inside it, so a server that breaks its thread-model promise is caught.
 * Build with -DMODEL=NBDHOST_THREAD_MODEL_...  Reads, opens and closes
 * take 20 ms to widen the window. */
#include <errno.h>
#include <stdio.h>
#include <time.h>
#include <nbdhost-plugin.h>

static const struct nbdhost_host *host;
static int inside;

/* Stay inside for 20 ms, saying so if another call was inside too. */
static void
occupy (const char *what)
{
  struct timespec ts = { 0, 20 * 1000 * 1000 };
  if (__atomic_add_fetch (&inside, 1, __ATOMIC_SEQ_CST) != 1)
    fprintf (stderr, "serial: %s while another call was inside\n", what);
  nanosleep (&ts, NULL);
  __atomic_sub_fetch (&inside, 1, __ATOMIC_SEQ_CST);
}

static void *
s_open (int readonly)
{
  (void) readonly;
  occupy ("open");
  return (void *) 1;
}

static void s_close (void *h) { (void) h; occupy ("close"); }

static int64_t s_get_size (void *h) { (void) h; return 1 << 20; }

static int
s_pread (void *h, void *buf, uint64_t count, uint64_t offset, uint32_t flags)
{
  struct timespec ts = { 0, 20 * 1000 * 1000 };
  (void) h; (void) buf; (void) count; (void) offset; (void) flags;
  if (__atomic_add_fetch (&inside, 1, __ATOMIC_SEQ_CST) != 1) {
    __atomic_sub_fetch (&inside, 1, __ATOMIC_SEQ_CST);
    host->error (EIO, "two calls at once");
    return -1;
  }
  nanosleep (&ts, NULL);
  __atomic_sub_fetch (&inside, 1, __ATOMIC_SEQ_CST);
  return 0;
}

static const struct nbdhost_plugin plugin = {
  .struct_size = sizeof plugin,
  .abi_version = NBDHOST_ABI_VERSION,
  .thread_model = MODEL,
  .name = "serial",
  .open = s_open,
  .close = s_close,
  .get_size = s_get_size,
  .pread = s_pread,
};

const struct nbdhost_plugin *
nbdhost_plugin_entry (const struct nbdhost_host *h)
{
  host = h;
  return &plugin;
}
