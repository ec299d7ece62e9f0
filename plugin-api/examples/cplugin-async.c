/* casync: a RAM disk whose requests are asynchronous (ABI 1.9), written
 * in C against nbdhost-plugin.h alone.
 *
 * Its callbacks only start requests: async_pread, async_pwrite,
 * async_zero and async_trim put each request on a queue and return at
 * once.  A thread of the plugin's own takes them off the queue, copies the
 * data into or out of the buffer the server lent, and answers each with
 * host->complete.  There is no synchronous pread or pwrite at all: a
 * filter above that calls next->pread still works, the server waits for
 * the asynchronous read on its behalf.  See ASYNCHRONOUS REQUESTS in
 * nbdhost-plugin(3).
 *
 * What it shows:
 *
 *  - the rules of complete: once per request, from any thread, possibly
 *    inside the call that started the request (before after_fork, when
 *    its thread does not run yet), with the errno and message of a
 *    failure (not host->error, which belongs to the callback);
 *  - what to save in open: the plugin's thread cannot ask for the export
 *    name, the connection or a debug flag, whose answers exist only
 *    inside a callback made for the connection;
 *  - complete as the last thing done with a request: as soon as it is
 *    called, the buffer goes back to the server and the handle may be
 *    closed;
 *  - a thread started in after_fork and stopped in unload, and
 *    NBDHOST_NONBLOCKING, honestly: starting a request never waits.
 *
 * Build, against an installed nbdhost:
 *
 *   cc $(pkg-config --cflags nbdhost) -shared -fPIC -Wall -Werror -pthread -o libcasyncplugin.so cplugin-async.c
 *
 * or from the top of the source tree:
 *
 *   cc -shared -fPIC -Wall -Werror -pthread -I plugin-api/include -o libcasyncplugin.so plugin-api/examples/cplugin-async.c
 *
 * Run (-v -D casync.trace=1 logs each request from the plugin's thread):
 *
 *   nbdhost ./libcasyncplugin.so size=64M
 */

#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "nbdhost-plugin.h"

static uint64_t size = UINT64_C (1) << 20; /* 1 MiB */
/* Touched only by the plugin's thread once it runs, so it needs no lock;
 * before that, by the callbacks that start requests. */
static unsigned char *disk;

/* What a connection's requests need on the plugin's thread, saved in open
 * while the host can still answer for the connection. */
struct casync_handle {
  uint64_t connection;          /* host->connection_id () */
  char *export_name;            /* a copy of host->export_name () */
  int trace;                    /* host->debug_flag ("trace") */
};

enum kind { READ, WRITE, ZERO, TRIM };

/* One request on its way to the plugin's thread. */
struct job {
  struct job *next;
  enum kind kind;
  struct casync_handle *h;
  void *rbuf;                   /* READ: where the data goes */
  const void *wbuf;             /* WRITE: the data */
  uint64_t count, offset;
  struct nbdhost_request *req;
};

/* The queue, and the thread that empties it. */
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t wake = PTHREAD_COND_INITIALIZER;
static struct job *first, *last;
static int running, stopping;
static pthread_t thread;

/* Log a line from any thread: host->log records nothing and is not tied
 * to a callback (from the plugin's own thread, the server logs it under
 * its own name, as no layer is being called). */
static void say (const char *fmt, ...) __attribute__ ((format (printf, 1, 2)));
static void
say (const char *fmt, ...)
{
  char msg[256];
  va_list ap;

  va_start (ap, fmt);
  vsnprintf (msg, sizeof msg, fmt, ap);
  va_end (ap);
  nbdhost_host->log (NBDHOST_LOG_DEBUG, msg);
}

/* Do one request and answer it. */
static void
run (struct job *j)
{
  static const char *const names[] = { "read", "write", "zero", "trim" };

  switch (j->kind) {
  case READ:
    memcpy (j->rbuf, disk + j->offset, j->count);
    break;
  case WRITE:
    memcpy (disk + j->offset, j->wbuf, j->count);
    break;
  case ZERO:
  case TRIM:                    /* on a RAM disk, a trim zeroes too */
    memset (disk + j->offset, 0, j->count);
    break;
  }
  /* Before complete: once it is called, close may free the handle. */
  if (j->h->trace)
    say ("casync: connection %" PRIu64 " (export \"%s\"): %s of %" PRIu64
         " bytes at %" PRIu64 " done on the plugin's thread",
         j->h->connection, j->h->export_name, names[j->kind], j->count,
         j->offset);
  nbdhost_host->complete (j->req, 0, NULL);
  free (j);
}

static void *
worker (void *arg)
{
  (void) arg;
  for (;;) {
    struct job *j;

    pthread_mutex_lock (&lock);
    while (first == NULL && !stopping)
      pthread_cond_wait (&wake, &lock);
    j = first;
    if (j != NULL && (first = j->next) == NULL)
      last = NULL;
    pthread_mutex_unlock (&lock);
    if (j == NULL)
      return NULL;              /* stopping, and nothing left */
    run (j);
  }
}

/* Start a request: queue it for the plugin's thread.  This is all the
 * async_* callbacks do, so none of them ever waits. */
static void
submit (struct casync_handle *h, enum kind kind, void *rbuf,
        const void *wbuf, uint64_t count, uint64_t offset,
        struct nbdhost_request *req)
{
  struct job *j = malloc (sizeof *j);

  if (j == NULL) {
    /* A failure goes with complete, even inside the starting call. */
    nbdhost_host->complete (req, ENOMEM, "casync: out of memory");
    return;
  }
  *j = (struct job) { .kind = kind, .h = h, .rbuf = rbuf, .wbuf = wbuf,
                      .count = count, .offset = offset, .req = req };
  pthread_mutex_lock (&lock);
  if (!running) {
    /* Before after_fork (a filter's startup looks at the disk before the
     * server forks): no thread yet, so answer here, inside the call that
     * started the request, which is allowed. */
    pthread_mutex_unlock (&lock);
    run (j);
    return;
  }
  if (last != NULL)
    last->next = j;
  else
    first = j;
  last = j;
  pthread_cond_signal (&wake);
  pthread_mutex_unlock (&lock);
}

static int
casync_load (void)
{
  /* Without complete (a server older than ABI 1.9) the async_* fields
   * are ignored and this plugin could not read at all: say so now. */
  if (nbdhost_host->struct_size < offsetof (struct nbdhost_host, complete)
                                  + sizeof nbdhost_host->complete) {
    nbdhost_error (ENOTSUP, "casync needs a server of ABI 1.9 or later");
    return -1;
  }
  return 0;
}

static int
casync_config (const char *key, const char *value)
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
casync_get_ready (void)
{
  if (size > SIZE_MAX) {
    nbdhost_error (EINVAL, "size %" PRIu64 " is too large for this machine", size);
    return -1;
  }
  disk = calloc (size ? (size_t) size : 1, 1);
  if (disk == NULL) {
    nbdhost_error (ENOMEM, "cannot allocate %" PRIu64 " bytes", size);
    return -1;
  }
  return 0;
}

/* Threads start here, once the server has forked (if it does). */
static int
casync_after_fork (void)
{
  int err = pthread_create (&thread, NULL, worker, NULL);

  if (err != 0) {
    nbdhost_error (err, "cannot start the plugin's thread: %s", strerror (err));
    return -1;
  }
  pthread_mutex_lock (&lock);
  running = 1;
  pthread_mutex_unlock (&lock);
  return 0;
}

/* Every handle is closed by now, so no request is in flight: stop the
 * thread before the server unloads the code it runs. */
static void
casync_unload (void)
{
  pthread_mutex_lock (&lock);
  stopping = 1;
  pthread_cond_signal (&wake);
  pthread_mutex_unlock (&lock);
  if (running)
    pthread_join (thread, NULL);
  free (disk);
  disk = NULL;
}

static uint64_t
casync_capabilities (void)
{
  return NBDHOST_NONBLOCKING;   /* starting a request only queues it */
}

static void *
casync_open (int readonly)
{
  struct casync_handle *h = calloc (1, sizeof *h);
  const char *name = nbdhost_host->export_name ();

  (void) readonly;              /* the server refuses writes itself */
  if (h == NULL || (h->export_name = strdup (name ? name : "")) == NULL) {
    free (h);
    nbdhost_error (ENOMEM, "out of memory");
    return NULL;
  }
  h->connection = nbdhost_host->connection_id ();
  h->trace = nbdhost_host->debug_flag ("trace");
  return h;
}

/* Called once no request of the handle is in flight any more. */
static void
casync_close (void *handle)
{
  struct casync_handle *h = handle;

  free (h->export_name);
  free (h);
}

static int64_t
casync_get_size (void *handle)
{
  (void) handle;
  return (int64_t) size;
}

/* The server never asks for bytes past the size, and the buffers stay
 * valid until complete is called. */
static void
casync_async_pread (void *handle, void *buf, uint64_t count,
                    uint64_t offset, uint32_t flags,
                    struct nbdhost_request *req)
{
  (void) flags;
  submit (handle, READ, buf, NULL, count, offset, req);
}

static void
casync_async_pwrite (void *handle, const void *buf, uint64_t count,
                     uint64_t offset, uint32_t flags,
                     struct nbdhost_request *req)
{
  (void) flags;                 /* no flush, so FUA is never asked for */
  submit (handle, WRITE, NULL, buf, count, offset, req);
}

/* Zeroing has its own asynchronous callback: without one the server
 * would write zeroes through async_pwrite and wait for them, on an event
 * loop, since this plugin says it never blocks. */
static void
casync_async_zero (void *handle, uint64_t count, uint64_t offset,
                   uint32_t flags, struct nbdhost_request *req)
{
  (void) flags;
  submit (handle, ZERO, NULL, NULL, count, offset, req);
}

static void
casync_async_trim (void *handle, uint64_t count, uint64_t offset,
                   uint32_t flags, struct nbdhost_request *req)
{
  (void) flags;
  submit (handle, TRIM, NULL, NULL, count, offset, req);
}

/* struct_size and abi_version are filled by NBDHOST_REGISTER_PLUGIN.
 * The can_* defaults count an asynchronous callback as provided:
 * writes, zeroes and trims are advertised. */
static struct nbdhost_plugin plugin = {
  .thread_model = NBDHOST_THREAD_MODEL_PARALLEL,
  .name = "casync",
  .version = "1.0",
  .description = "RAM disk whose requests complete on a thread of its own",
  .config_help = "size=<SIZE>  Size of the disk (default 1M).",
  .magic_config_key = "size",
  .load = casync_load,
  .unload = casync_unload,
  .config = casync_config,
  .get_ready = casync_get_ready,
  .capabilities = casync_capabilities,
  .after_fork = casync_after_fork,
  .open = casync_open,
  .close = casync_close,
  .get_size = casync_get_size,
  .async_pread = casync_async_pread,
  .async_pwrite = casync_async_pwrite,
  .async_trim = casync_async_trim,
  .async_zero = casync_async_zero,
};

NBDHOST_REGISTER_PLUGIN (plugin)
