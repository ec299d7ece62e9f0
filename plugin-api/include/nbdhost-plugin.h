/* nbdhost plugin ABI.
 *
 * A plugin is a shared object that exports one function,
 * nbdhost_plugin_entry, which returns a pointer to a struct nbdhost_plugin
 * that lives as long as the shared object is loaded.  The struct begins with
 * its own size and the ABI version so that the server can accept plugins
 * built against any older header: fields are only ever appended, and a
 * callback that lies past the end of a plugin's struct is treated as absent.
 *
 * The plugin needs no symbols from the server executable: every host
 * service arrives through struct nbdhost_host, passed to the entry point.
 *
 * See nbdhost-plugin(3) for the full contract.
 */
#ifndef NBDHOST_PLUGIN_H
#define NBDHOST_PLUGIN_H

#include <errno.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The ABI version is (major << 16) | minor.  A server accepts any plugin
 * whose major equals its own, whatever the minor. */
#define NBDHOST_ABI_MAJOR 1
#define NBDHOST_ABI_MINOR 10
#define NBDHOST_ABI_VERSION ((NBDHOST_ABI_MAJOR << 16) | NBDHOST_ABI_MINOR)

/* Name of the symbol every plugin exports. */
#define NBDHOST_PLUGIN_ENTRY "nbdhost_plugin_entry"
/* Since ABI 1.5: the symbol an adapter exports, which serves a plugin
 * written for another server (see nbdhost_plugin_adapter_entry_fn). */
#define NBDHOST_PLUGIN_ADAPTER_ENTRY "nbdhost_plugin_adapter_entry"

/* Thread models, from most to least restrictive. */
#define NBDHOST_THREAD_MODEL_SERIALIZE_CONNECTIONS  0
#define NBDHOST_THREAD_MODEL_SERIALIZE_ALL_REQUESTS 1
#define NBDHOST_THREAD_MODEL_SERIALIZE_REQUESTS     2
#define NBDHOST_THREAD_MODEL_PARALLEL               3

/* Flags passed to data callbacks. */
#define NBDHOST_FLAG_MAY_TRIM  (1 << 0) /* zero: the range may be punched */
#define NBDHOST_FLAG_FUA       (1 << 1) /* write, trim, zero: persist first */
#define NBDHOST_FLAG_REQ_ONE   (1 << 2) /* extents: one extent is enough */
#define NBDHOST_FLAG_FAST_ZERO (1 << 3) /* zero: fail with ENOTSUP if slow */

/* Return values of can_fua and can_cache. */
#define NBDHOST_FUA_NONE      0
#define NBDHOST_FUA_EMULATE   1
#define NBDHOST_FUA_NATIVE    2
#define NBDHOST_CACHE_NONE    0
#define NBDHOST_CACHE_EMULATE 1
#define NBDHOST_CACHE_NATIVE  2

/* Capability bits returned by the capabilities callback of struct
 * nbdhost_plugin and struct nbdhost_filter (since ABI 1.4). */
#define NBDHOST_NONBLOCKING (1 << 0) /* no callback ever waits */
/* Since ABI 1.9, for plugins: as configured, the async_* callbacks are
 * not to be used; the server starts requests with the synchronous ones
 * (a plugin that can do either, configured for threads). */
#define NBDHOST_SYNCHRONOUS (1 << 1)

/* Levels of host->log (since ABI 1.5). */
#define NBDHOST_LOG_ERROR   0
#define NBDHOST_LOG_WARNING 1
#define NBDHOST_LOG_INFO    2
#define NBDHOST_LOG_DEBUG   3

/* Extent types, as in the NBD base:allocation context. */
#define NBDHOST_EXTENT_HOLE (1 << 0)
#define NBDHOST_EXTENT_ZERO (1 << 1)

/* Opaque lists the server owns; plugins fill them through host services. */
struct nbdhost_extents;
struct nbdhost_exports;
/* Since ABI 1.9: an asynchronous request in flight, the server's token for
 * whoever waits for its result (see ASYNCHRONOUS REQUESTS in
 * nbdhost-plugin(3)).  Never dereference it. */
struct nbdhost_request;

/* Services the server offers to plugins.  Like struct nbdhost_plugin, it
 * starts with its size and version and only grows at the end: check
 * struct_size before calling a member added after your minimum version. */
struct nbdhost_host {
  uint64_t struct_size;
  uint32_t abi_version;
  uint32_t reserved;

  /* Record the error of the current callback.  errnum is an errno value
   * that becomes the NBD error sent to the client.  msg, if not NULL, is
   * logged together with the plugin's name.  The callback then returns -1
   * (or NULL). */
  void (*error) (int errnum, const char *msg);
  /* Log a debug message (shown with -v). */
  void (*debug) (const char *msg);
  /* Append one extent to a list passed to the extents callback.  Extents
   * must be added in order and without gaps. Returns 0, or -1 with the
   * error already recorded. */
  int (*add_extent) (struct nbdhost_extents *extents,
                     uint64_t offset, uint64_t length, uint32_t type);
  /* Append one export to a list passed to list_exports.  description may
   * be NULL.  Returns 0 or -1. */
  int (*add_export) (struct nbdhost_exports *exports,
                     const char *name, const char *description);
  /* Parse a size such as "512", "64K", "1G" or "1.5T".  Returns the size in
   * bytes, or -1 with the error recorded and logged. */
  int64_t (*parse_size) (const char *str);
  /* Read a secret given on the command line: "VALUE" as is, "+FILE" from a
   * file, "-FD" from an open file descriptor, "-" by prompting on the
   * terminal.  On success *secret is a NUL-terminated string that must be
   * released with free_secret; returns 0, or -1 with the error recorded.
   * The secret itself never appears in a log message. */
  int (*read_secret) (const char *value, char **secret);
  /* Wipe and free a string returned by read_secret. */
  void (*free_secret) (char *secret);
  /* Copy the peer address of the current connection into addr, as
   * getpeername(2) does.  Only valid in callbacks made on behalf of a
   * connection.  Returns 0 or -1. */
  int (*peer_name) (struct sockaddr *addr, socklen_t *addrlen);
  /* Export name the client asked for, valid in callbacks made on behalf of
   * a connection; NULL otherwise.  The string lives as long as the
   * connection. */
  const char *(*export_name) (void);
  /* The value of the debug flag NAME set with -D PLUGIN.NAME=N, or 0. */
  int (*debug_flag) (const char *name);

  /* Since ABI 1.1: for filters that read a lower layer's extents. */
  /* A new, empty extent list for the range starting at offset. */
  struct nbdhost_extents *(*extents_new) (uint64_t offset);
  void (*extents_free) (struct nbdhost_extents *extents);
  size_t (*extents_count) (const struct nbdhost_extents *extents);
  /* Extent i (0-based); returns 0, or -1 if i is out of range. */
  int (*extents_get) (const struct nbdhost_extents *extents, size_t i,
                      uint64_t *offset, uint64_t *length, uint32_t *type);
  /* The errno recorded by the last failed call on this thread (for a
   * filter that inspects why the next layer failed). */
  int (*last_errno) (void);
  /* Since ABI 1.1: 1 if the current connection is protected by TLS. */
  int (*is_tls) (void);
  /* The current connection's TLS identity: the PSK user name or the
   * client certificate's subject DN; NULL without TLS or identity.  Valid
   * for the connection's lifetime. */
  const char *(*peer_identity) (void);

  /* Since ABI 1.3: sleep for sec seconds and nsec nanoseconds, but wake
   * early when the server starts shutting down.  Returns 0 after the full
   * time, or -1 with errno ESHUTDOWN (and the error recorded) when cut
   * short.  Use it for deliberate waits so they never hold up a shutdown. */
  int (*nanosleep) (uint64_t sec, uint64_t nsec);

  /* Since ABI 1.5. */
  /* Log msg now at NBDHOST_LOG_ERROR, _WARNING, _INFO or _DEBUG (shown
   * with -v), under the layer's name.  Unlike error, it records nothing:
   * for messages that do not end the callback in failure, or that come
   * from a thread of the plugin's own. */
  void (*log) (int level, const char *msg);
  /* The name of the i-th (from 0) debug flag the user set for this layer
   * with -D LAYER.NAME=N, or NULL past the last; debug_flag gives its
   * value.  For a layer that must know every flag it was given. */
  const char *(*debug_flag_name) (size_t i);
  /* The credentials of the current connection's peer on a Unix socket, as
   * SO_PEERCRED reports them when it connected.  Returns 0, or -1 with the
   * error recorded for other transports and outside a connection. */
  int (*peer_credentials) (int64_t *pid, int64_t *uid, int64_t *gid);
  /* On a TLS connection whose client presented a certificate that the
   * server verified (--tls-verify-peer): the certificate's subject DN, or
   * its issuer's DN as GnuTLS gives it, first part first
   * (O=Example,CN=client).  NULL otherwise.  Valid for the
   * connection's lifetime. */
  const char *(*peer_tls_dn) (void);
  const char *(*peer_tls_issuer_dn) (void);
  /* Ask the server to shut down as SIGTERM would.  Returns at once;
   * callbacks may still be made while connections finish. */
  void (*shutdown) (void);
  /* Close the current connection once this callback returns.  With force,
   * at once: replies not yet sent are dropped.  Without, the server reads
   * no further requests and closes after answering those already
   * running.  Only in callbacks made for an opened connection. */
  void (*disconnect) (int force);
  /* 1 if the layer may read stdin and write stdout while it is being
   * configured; 0 when they carry the NBD connection (-s). */
  int (*stdio_safe) (void);

  /* Since ABI 1.6.  The number of the connection the current callback is
   * made for: 1, 2, ... in the order the server accepted them, the number
   * its log gives it.  0 outside a connection's callbacks. */
  uint64_t (*connection_id) (void);

  /* Since ABI 1.7, for a filter's list_exports: a new, empty export list
   * of its own (NULL with the error recorded if out of memory), to pass to
   * the layer below and read back; freed with exports_free.  exports_count
   * and exports_get read any list.  exports_get sets name and description
   * (which may be NULL) for the i-th export, valid until the list changes
   * or is freed; it returns 0, or -1 with the error recorded past the
   * end. */
  struct nbdhost_exports *(*exports_new) (void);
  void (*exports_free) (struct nbdhost_exports *exports);
  size_t (*exports_count) (const struct nbdhost_exports *exports);
  int (*exports_get) (const struct nbdhost_exports *exports, size_t i,
                      const char **name, const char **description);

  /* Since ABI 1.9.  Complete the asynchronous request req: errnum 0 for
   * success, else the errno value the client gets; msg, if not NULL, is
   * logged with the layer's name (it replaces host->error, which records
   * nothing for a request already started).  Call it exactly once per
   * request, from any thread, possibly before the callback that started
   * the request has returned.  A second completion is logged and ignored.
   * It holds no lock of the server while it runs, and never calls back
   * into the layer. */
  void (*complete) (struct nbdhost_request *req, int errnum, const char *msg);
  /* Since ABI 1.9, for filters: a new request that, once completed by the
   * layer below it is passed to, calls done (data, errnum) on one of the
   * server's worker threads, as a callback made for the connection of the
   * callback that called request_then (so host->export_name and the like
   * answer in it).  Only inside a filter's callback made for a
   * connection.  NULL with the error recorded if it cannot be made. */
  struct nbdhost_request *(*request_then) (void (*done) (void *data,
                                                          int errnum),
                                           void *data);
};

/* A plugin.  Every callback may be NULL; the defaults are those described
 * in nbdhost-plugin(3).  Callbacks return 0 (or a non-negative value) on
 * success and -1 after recording the error with host->error. */
struct nbdhost_plugin {
  uint64_t struct_size;       /* sizeof (struct nbdhost_plugin) */
  uint32_t abi_version;       /* NBDHOST_ABI_VERSION */
  uint32_t thread_model;      /* NBDHOST_THREAD_MODEL_* */

  const char *name;           /* short name, [a-z0-9_-]+ */
  const char *version;
  const char *description;    /* one line */
  const char *config_help;    /* key=value lines, for --help */
  const char *magic_config_key; /* key that a bare value on the command line sets */

  int (*load) (void);
  void (*unload) (void);
  int (*config) (const char *key, const char *value);
  int (*config_complete) (void);
  int (*get_ready) (void);
  int (*preconnect) (int readonly);
  int (*list_exports) (int readonly, int is_tls,
                       struct nbdhost_exports *exports);
  const char *(*default_export) (int readonly, int is_tls);

  void *(*open) (int readonly);
  void (*close) (void *handle);

  int64_t (*get_size) (void *handle);
  int (*block_size) (void *handle,
                     uint32_t *minimum, uint32_t *preferred, uint32_t *maximum);
  int (*can_write) (void *handle);
  int (*can_flush) (void *handle);
  int (*can_trim) (void *handle);
  int (*can_zero) (void *handle);
  int (*can_fast_zero) (void *handle);
  int (*can_fua) (void *handle);
  int (*can_multi_conn) (void *handle);
  int (*can_cache) (void *handle);
  int (*can_extents) (void *handle);
  int (*is_rotational) (void *handle);
  const char *(*export_description) (void *handle);

  int (*pread) (void *handle, void *buf, uint64_t count, uint64_t offset,
                uint32_t flags);
  int (*pwrite) (void *handle, const void *buf, uint64_t count,
                 uint64_t offset, uint32_t flags);
  int (*flush) (void *handle, uint32_t flags);
  int (*trim) (void *handle, uint64_t count, uint64_t offset, uint32_t flags);
  int (*zero) (void *handle, uint64_t count, uint64_t offset, uint32_t flags);
  int (*extents) (void *handle, uint64_t count, uint64_t offset,
                  uint32_t flags, struct nbdhost_extents *extents);
  int (*cache) (void *handle, uint64_t count, uint64_t offset, uint32_t flags);

  /* Since ABI 1.4.  Called once after get_ready.  Returns
   * NBDHOST_NONBLOCKING if, as configured, no callback ever waits: not for
   * I/O, not in a sleep, not on a lock that is held across either.  The
   * server may then run every callback on its event loops, answering a
   * request on the thread that read it, instead of handing it to a worker
   * thread.  Other bits are reserved: return them as 0.  Leave the bit
   * clear if in doubt: a plugin that blocks on an event loop stalls every
   * connection that loop serves. */
  uint64_t (*capabilities) (void);

  /* Since ABI 1.5. */
  /* Called once after config_complete: the thread model the plugin needs
   * as configured, for a plugin whose needs depend on its parameters.  A
   * model less strict than thread_model is ignored.  Returns one of
   * NBDHOST_THREAD_MODEL_*, or -1 with the error recorded. */
  int (*configured_thread_model) (void);
  /* Called once the server is serving: after it went into the background,
   * if it does.  Start threads here rather than earlier, since forking
   * does not keep them.  Returns 0, or -1 with the error recorded: the
   * server then exits. */
  int (*after_fork) (void);
  /* For --dump-plugin: print further key=value lines on stdout. */
  void (*dump_plugin) (void);

  /* Since ABI 1.8.  The absolute path of the local file or block device
   * whose bytes this handle serves, or NULL if it serves none (the
   * default).  Format filters resolve relative backing-file names against
   * its directory and take qemu's image locks on it.  The string stays
   * valid until the next call on this thread. */
  const char *(*local_file) (void *handle);

  /* Since ABI 1.9: asynchronous requests.  Each starts the request and
   * returns at once; its result is given later with host->complete (req,
   * ...), exactly once, from any thread, possibly before the callback
   * returns.  buf (and extents) stay valid until then, and the handle is
   * not closed while a request on it is in flight.  A plugin may define
   * any of them beside, or instead of, the synchronous callbacks; the
   * server then starts that kind of request this way.  The thread model
   * governs the starting calls (it never lets two overlap where it
   * forbids it), not the time requests are in flight.  See
   * nbdhost-plugin(3). */
  void (*async_pread) (void *handle, void *buf, uint64_t count,
                       uint64_t offset, uint32_t flags,
                       struct nbdhost_request *req);
  void (*async_pwrite) (void *handle, const void *buf, uint64_t count,
                        uint64_t offset, uint32_t flags,
                        struct nbdhost_request *req);
  void (*async_flush) (void *handle, uint32_t flags,
                       struct nbdhost_request *req);
  void (*async_trim) (void *handle, uint64_t count, uint64_t offset,
                      uint32_t flags, struct nbdhost_request *req);
  void (*async_zero) (void *handle, uint64_t count, uint64_t offset,
                      uint32_t flags, struct nbdhost_request *req);
  void (*async_cache) (void *handle, uint64_t count, uint64_t offset,
                       uint32_t flags, struct nbdhost_request *req);
  void (*async_extents) (void *handle, uint64_t count, uint64_t offset,
                         uint32_t flags, struct nbdhost_extents *extents,
                         struct nbdhost_request *req);
};

/* The one symbol a plugin exports.  host stays valid until the plugin is
 * unloaded. */
typedef const struct nbdhost_plugin *
  (*nbdhost_plugin_entry_fn) (const struct nbdhost_host *host);

/* Since ABI 1.5.  An adapter serves plugins written for another server.
 * When the server finds such a plugin (by its own entry symbol, or in that
 * server's plugin directory), it loads the adapter and calls this entry
 * with the foreign plugin's path instead of nbdhost_plugin_entry.  It
 * returns a struct describing the foreign plugin, valid until the adapter
 * is unloaded, or NULL with the error recorded. */
typedef const struct nbdhost_plugin *
  (*nbdhost_plugin_adapter_entry_fn) (const struct nbdhost_host *host,
                                      const char *path);

/* Registration and formatted messages: conveniences of this header, with
 * nothing in the ABI behind them.
 *
 *   static struct nbdhost_plugin plugin = { .name = "demo", ... };
 *   NBDHOST_REGISTER_PLUGIN (plugin)
 *
 * defines nbdhost_plugin_entry for the struct: it fills struct_size (this
 * header's size of the struct) and abi_version, refuses a server of
 * another major version, and keeps the host table in nbdhost_host for the
 * whole plugin, so callbacks can say
 *
 *   nbdhost_error (EINVAL, "size=%s: not a size", value);
 *   nbdhost_debug ("opened %s", path);
 *
 * The struct must not be const: the entry point completes it. */

/* The host table kept by NBDHOST_REGISTER_PLUGIN (or _FILTER), valid
 * until the layer is unloaded.  Weak and hidden: every file of one plugin
 * shares it, and no other object sees it. */
__attribute__ ((weak, visibility ("hidden")))
const struct nbdhost_host *nbdhost_host;

#define NBDHOST_EXPORT __attribute__ ((visibility ("default")))

#define NBDHOST_REGISTER_PLUGIN(plugin)                                  \
  NBDHOST_EXPORT const struct nbdhost_plugin *                           \
  nbdhost_plugin_entry (const struct nbdhost_host *nbdhost_host_arg);    \
  NBDHOST_EXPORT const struct nbdhost_plugin *                           \
  nbdhost_plugin_entry (const struct nbdhost_host *nbdhost_host_arg)     \
  {                                                                      \
    if (nbdhost_host_arg == NULL ||                                      \
        nbdhost_host_arg->abi_version >> 16 != NBDHOST_ABI_MAJOR)        \
      return NULL;                                                       \
    nbdhost_host = nbdhost_host_arg;                                     \
    (plugin).struct_size = sizeof (plugin);                              \
    (plugin).abi_version = NBDHOST_ABI_VERSION;                          \
    return &(plugin);                                                    \
  }

/* printf into a new string (NULL if out of memory); errno is kept, so
 * that %m names the caller's error. */
static inline char *
nbdhost_vformat_ (const char *fmt, va_list ap)
{
  int saved = errno, n;
  char *s = NULL;
  va_list again;

  va_copy (again, ap);
  n = vsnprintf (NULL, 0, fmt, again);
  va_end (again);
  if (n >= 0 && (s = malloc ((size_t) n + 1)) != NULL) {
    errno = saved;
    vsnprintf (s, (size_t) n + 1, fmt, ap);
  }
  errno = saved;
  return s;
}

/* Record the current callback's error, as host->error, with a printf
 * message.  errno is left as it was. */
static inline void nbdhost_error (int errnum, const char *fmt, ...)
  __attribute__ ((format (printf, 2, 3)));
static inline void
nbdhost_error (int errnum, const char *fmt, ...)
{
  va_list ap;
  char *msg;
  int saved = errno;

  va_start (ap, fmt);
  msg = nbdhost_vformat_ (fmt, ap);
  va_end (ap);
  if (nbdhost_host != NULL)
    nbdhost_host->error (errnum, msg);
  free (msg);
  errno = saved;
}

/* Log a debug message (shown with -v), as host->debug, with a printf
 * message.  errno is left as it was. */
static inline void nbdhost_debug (const char *fmt, ...)
  __attribute__ ((format (printf, 1, 2)));
static inline void
nbdhost_debug (const char *fmt, ...)
{
  va_list ap;
  char *msg;
  int saved = errno;

  if (nbdhost_host == NULL || nbdhost_host->debug == NULL)
    return;
  va_start (ap, fmt);
  msg = nbdhost_vformat_ (fmt, ap);
  va_end (ap);
  if (msg != NULL)
    nbdhost_host->debug (msg);
  free (msg);
  errno = saved;
}

#ifdef __cplusplus
}
#endif

#endif /* NBDHOST_PLUGIN_H */
