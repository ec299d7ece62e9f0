/* A RAM disk whose requests are all asynchronous (ABI 1.9): it has no
 * synchronous pread or pwrite at all.  Parameters:
 *
 *   size=BYTES   the disk's size (default 16 MiB)
 *   mode=threads completed by four threads of the plugin's own, picking
 *                pending requests at random (out of order), after up to
 *                hold_ms milliseconds (the default)
 *   mode=inline  completed inside the callback that started them
 *   mode=twice   completed twice by the plugin's threads: the server must
 *                ignore the second
 *   hold_ms=N    how long the threads keep each request (default 2)
 *   file=PATH    the disk's first contents, and its size
 *
 * The data is copied when the request completes, on the plugin's thread,
 * into or out of the buffer the server lent: any buffer freed too early
 * is written after its end of life, which AddressSanitizer reports. */
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <nbdhost-plugin.h>

enum kind { READ, WRITE, FLUSH };

struct pending {
  enum kind kind;
  void *rbuf;
  const void *wbuf;
  uint64_t count, offset;
  struct nbdhost_request *req;
  struct timespec due;
};

static uint64_t size = 16 << 20;
static char *disk;
static int mode_inline, mode_twice;
static long hold_ms = 2;
static char *file;
/* The threads start after the fork: requests made before (a filter's
 * look at the disk at start-up) are completed in the starting call. */
static int started;

/* The plugin's threads, stopped and joined at unload (after the server
 * has waited for every request in flight), so none outlives the library
 * and nothing it allocated leaks. */
#define THREADS 4
static pthread_t threads[THREADS];
static int stopping;

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cond = PTHREAD_COND_INITIALIZER;
static struct pending **queue;
static size_t queued, room;
static unsigned seed = 1;

static int
async_config (const char *key, const char *value)
{
  if (strcmp (key, "size") == 0)
    size = strtoull (value, NULL, 0);
  else if (strcmp (key, "file") == 0) {
    FILE *f = fopen (value, "rb");
    long n;

    if (f == NULL || fseek (f, 0, SEEK_END) != 0 || (n = ftell (f)) < 0) {
      nbdhost_error (errno, "%s: %m", value);
      if (f)
        fclose (f);
      return -1;
    }
    fclose (f);
    size = (uint64_t) n;
    free (file);
    file = strdup (value);
  }
  else if (strcmp (key, "hold_ms") == 0)
    hold_ms = strtol (value, NULL, 0);
  else if (strcmp (key, "mode") == 0) {
    mode_inline = strcmp (value, "inline") == 0;
    mode_twice = strcmp (value, "twice") == 0;
  }
  else {
    nbdhost_error (EINVAL, "unknown parameter %s", key);
    return -1;
  }
  return 0;
}

static void
run (struct pending *p)
{
  if (p->kind == READ)
    memcpy (p->rbuf, disk + p->offset, p->count);
  else if (p->kind == WRITE)
    memcpy (disk + p->offset, p->wbuf, p->count);
  nbdhost_host->complete (p->req, 0, NULL);
  if (mode_twice)
    nbdhost_host->complete (p->req, 0, NULL);
  free (p);
}

static void *
worker (void *arg)
{
  for (;;) {
    struct pending *p;
    size_t i;

    pthread_mutex_lock (&lock);
    while (queued == 0 && !stopping)
      pthread_cond_wait (&cond, &lock);
    if (queued == 0) {
      pthread_mutex_unlock (&lock);
      return NULL;
    }
    i = (size_t) rand_r (&seed) % queued;
    p = queue[i];
    queue[i] = queue[--queued];
    pthread_mutex_unlock (&lock);
    clock_nanosleep (CLOCK_MONOTONIC, TIMER_ABSTIME, &p->due, NULL);
    run (p);
  }
  return NULL;
}

static int
async_get_ready (void)
{
  disk = calloc (1, size);
  if (disk == NULL) {
    nbdhost_error (ENOMEM, "no memory for the disk");
    return -1;
  }
  if (file) {
    FILE *f = fopen (file, "rb");

    if (f == NULL || fread (disk, 1, size, f) != size) {
      nbdhost_error (EIO, "%s: cannot read it", file);
      if (f)
        fclose (f);
      return -1;
    }
    fclose (f);
  }
  return 0;
}

static int
async_after_fork (void)
{
  int i;

  for (i = 0; i < THREADS; i++) {
    if (pthread_create (&threads[i], NULL, worker, NULL) != 0) {
      nbdhost_error (errno, "pthread_create");
      return -1;
    }
    started = i + 1;
  }
  return 0;
}

static void
async_unload (void)
{
  int i;

  pthread_mutex_lock (&lock);
  stopping = 1;
  pthread_cond_broadcast (&cond);
  pthread_mutex_unlock (&lock);
  for (i = 0; i < started; i++)
    pthread_join (threads[i], NULL);
  free (queue);
  free (disk);
  free (file);
}

static void *
async_open (int readonly)
{
  return disk;
}

static int64_t
async_get_size (void *handle)
{
  return size;
}

static int
async_can_write (void *handle)
{
  return 1;
}

static int
async_can_flush (void *handle)
{
  return 1;
}

static int
async_can_multi_conn (void *handle)
{
  return 1;
}

static void
submit (enum kind kind, void *rbuf, const void *wbuf, uint64_t count,
        uint64_t offset, struct nbdhost_request *req)
{
  struct pending *p = malloc (sizeof *p);

  if (p == NULL) {
    nbdhost_host->complete (req, ENOMEM, "out of memory");
    return;
  }
  *p = (struct pending) { .kind = kind, .rbuf = rbuf, .wbuf = wbuf,
                          .count = count, .offset = offset, .req = req };
  if (mode_inline || !started) {
    run (p);
    return;
  }
  clock_gettime (CLOCK_MONOTONIC, &p->due);
  p->due.tv_nsec += (long) (rand_r (&seed) % (unsigned) (hold_ms + 1)) * 1000000;
  p->due.tv_sec += p->due.tv_nsec / 1000000000;
  p->due.tv_nsec %= 1000000000;
  pthread_mutex_lock (&lock);
  if (queued == room) {
    room = room ? 2 * room : 64;
    queue = realloc (queue, room * sizeof *queue);
  }
  queue[queued++] = p;
  pthread_cond_signal (&cond);
  pthread_mutex_unlock (&lock);
}

static void
async_pread (void *handle, void *buf, uint64_t count, uint64_t offset,
             uint32_t flags, struct nbdhost_request *req)
{
  submit (READ, buf, NULL, count, offset, req);
}

static void
async_pwrite (void *handle, const void *buf, uint64_t count, uint64_t offset,
              uint32_t flags, struct nbdhost_request *req)
{
  submit (WRITE, NULL, buf, count, offset, req);
}

static void
async_flush (void *handle, uint32_t flags, struct nbdhost_request *req)
{
  submit (FLUSH, NULL, NULL, 0, 0, req);
}

static struct nbdhost_plugin plugin = {
  .name = "async",
  .version = "1",
  .thread_model = NBDHOST_THREAD_MODEL_PARALLEL,
  .config = async_config,
  .unload = async_unload,
  .get_ready = async_get_ready,
  .after_fork = async_after_fork,
  .open = async_open,
  .get_size = async_get_size,
  .can_write = async_can_write,
  .can_flush = async_can_flush,
  .can_multi_conn = async_can_multi_conn,
  .async_pread = async_pread,
  .async_pwrite = async_pwrite,
  .async_flush = async_flush,
};

NBDHOST_REGISTER_PLUGIN (plugin)
