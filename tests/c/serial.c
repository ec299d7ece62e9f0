/* A plugin that fails any read made while another call is inside it, so a
 * server that breaks its thread-model promise is caught.  Build with
 * -DMODEL=NBDHOST_THREAD_MODEL_...  Reads take 20 ms to widen the window. */
#include <errno.h>
#include <time.h>
#include <nbdhost-plugin.h>

static const struct nbdhost_host *host;
static int inside;

static void *s_open (int readonly) { (void) readonly; return (void *) 1; }
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
  .get_size = s_get_size,
  .pread = s_pread,
};

const struct nbdhost_plugin *
nbdhost_plugin_entry (const struct nbdhost_host *h)
{
  host = h;
  return &plugin;
}
