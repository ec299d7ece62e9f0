/* nbdhost filter ABI.
 *
 * A filter is a shared object that sits between the client and the plugin
 * and sees every call on its way down.  It exports one function,
 * nbdhost_filter_entry, which returns a struct nbdhost_filter under the same
 * rules as plugins (nbdhost-plugin.h): the struct starts with its size and
 * the ABI version, fields are only appended, and callbacks past the end of
 * an older struct, or NULL, mean "pass the call to the next layer".
 *
 * Every per-connection callback receives the next layer as a struct
 * nbdhost_next, so a filter can call down, split a request, retry it, or
 * answer it itself.  See nbdhost-filter(3).
 */
#ifndef NBDHOST_FILTER_H
#define NBDHOST_FILTER_H

#include "nbdhost-plugin.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Name of the symbol every filter exports. */
#define NBDHOST_FILTER_ENTRY "nbdhost_filter_entry"
/* Since ABI 1.5: the symbol of an adapter for filters written for another
 * server, as for plugins (see nbdhost_plugin_adapter_entry_fn). */
#define NBDHOST_FILTER_ADAPTER_ENTRY "nbdhost_filter_adapter_entry"

/* Return values of a filter's config callback. */
#define NBDHOST_CONFIG_TAKEN   0  /* the key was this filter's */
#define NBDHOST_CONFIG_PASS    1  /* not this filter's: offer it further down */

/* Since ABI 1.7: the layer below a filter when no connection has opened
 * it, for list_exports and default_export.  The callbacks behave like the
 * plugin's of the same name; list_exports appends to exports (the
 * filter's own list from host->exports_new, or the one it was given), and
 * the string default_export returns stays valid until the filter's
 * callback returns. */
struct nbdhost_next_exports {
  uint64_t struct_size;
  void *opaque;               /* the server's; do not touch */

  int (*list_exports) (const struct nbdhost_next_exports *next,
                       int readonly, int is_tls,
                       struct nbdhost_exports *exports);
  const char *(*default_export) (const struct nbdhost_next_exports *next,
                                 int readonly, int is_tls);
};

/* The layer below a filter, opened for one connection.  Its callbacks
 * behave exactly like the plugin callbacks of the same name (return values,
 * flags, errors recorded with host->error), with `next` in place of the
 * plugin handle. */
struct nbdhost_next {
  uint64_t struct_size;
  void *opaque;               /* the server's; do not touch */

  int64_t (*get_size) (const struct nbdhost_next *next);
  int (*block_size) (const struct nbdhost_next *next,
                     uint32_t *minimum, uint32_t *preferred, uint32_t *maximum);
  int (*can_write) (const struct nbdhost_next *next);
  int (*can_flush) (const struct nbdhost_next *next);
  int (*can_trim) (const struct nbdhost_next *next);
  int (*can_zero) (const struct nbdhost_next *next);
  int (*can_fast_zero) (const struct nbdhost_next *next);
  int (*can_fua) (const struct nbdhost_next *next);
  int (*can_multi_conn) (const struct nbdhost_next *next);
  int (*can_cache) (const struct nbdhost_next *next);
  int (*can_extents) (const struct nbdhost_next *next);
  int (*is_rotational) (const struct nbdhost_next *next);
  /* The returned string stays valid until the next call on this thread. */
  const char *(*export_description) (const struct nbdhost_next *next);
  int (*pread) (const struct nbdhost_next *next, void *buf,
                uint64_t count, uint64_t offset, uint32_t flags);
  int (*pwrite) (const struct nbdhost_next *next, const void *buf,
                 uint64_t count, uint64_t offset, uint32_t flags);
  int (*flush) (const struct nbdhost_next *next, uint32_t flags);
  int (*trim) (const struct nbdhost_next *next,
               uint64_t count, uint64_t offset, uint32_t flags);
  int (*zero) (const struct nbdhost_next *next,
               uint64_t count, uint64_t offset, uint32_t flags);
  int (*extents) (const struct nbdhost_next *next,
                  uint64_t count, uint64_t offset, uint32_t flags,
                  struct nbdhost_extents *extents);
  int (*cache) (const struct nbdhost_next *next,
                uint64_t count, uint64_t offset, uint32_t flags);
  /* Since ABI 1.8 (check struct_size before calling): the layer below's
   * local_file.  The string stays valid until the next call on this
   * thread. */
  const char *(*local_file) (const struct nbdhost_next *next);

  /* Since ABI 1.9 (check struct_size): start a request on the layer below,
   * whose result completes req: the filter's own request passed down, when
   * the filter has nothing to do after it, or a new one from
   * host->request_then, whose continuation then runs.  The call returns at
   * once; buf and extents must stay valid until req completes.  Works on
   * every layer below: one without an asynchronous path runs the request
   * in the call and completes req before returning. */
  void (*async_pread) (const struct nbdhost_next *next, void *buf,
                       uint64_t count, uint64_t offset, uint32_t flags,
                       struct nbdhost_request *req);
  void (*async_pwrite) (const struct nbdhost_next *next, const void *buf,
                        uint64_t count, uint64_t offset, uint32_t flags,
                        struct nbdhost_request *req);
  void (*async_flush) (const struct nbdhost_next *next, uint32_t flags,
                       struct nbdhost_request *req);
  void (*async_trim) (const struct nbdhost_next *next, uint64_t count,
                      uint64_t offset, uint32_t flags,
                      struct nbdhost_request *req);
  void (*async_zero) (const struct nbdhost_next *next, uint64_t count,
                      uint64_t offset, uint32_t flags,
                      struct nbdhost_request *req);
  void (*async_cache) (const struct nbdhost_next *next, uint64_t count,
                       uint64_t offset, uint32_t flags,
                       struct nbdhost_request *req);
  void (*async_extents) (const struct nbdhost_next *next, uint64_t count,
                         uint64_t offset, uint32_t flags,
                         struct nbdhost_extents *extents,
                         struct nbdhost_request *req);

  /* Since ABI 1.10 (check struct_size before calling).  These four belong
   * to the filter's handle whose next this is: call them from its
   * callbacks, from the continuations of its requests and timers, or from
   * its background jobs; never after its close.
   *
   * reopen: finalize the layer below and open it again, for the same
   * connection and export name, read-only if readonly is non-zero; every
   * later call through next, on any thread, goes to the new handle.  The
   * old handle is not closed now, because a request started on it may
   * still be in flight: it is closed with the filter's handle.  Returns 0,
   * or -1 with the error recorded (next then still reaches the old
   * handle). */
  int (*reopen) (const struct nbdhost_next *next, int readonly);
  /* after: a timer that holds no thread.  done (data, errnum) runs once,
   * as a callback made for this connection: on a worker thread nsec
   * nanoseconds from now with errnum 0; at once, with ESHUTDOWN, when the
   * server begins shutting down first; or, if the filter's handle closes
   * first, on the closing thread before the filter's close, with
   * ECANCELED (done must then only free data).  done may run before
   * after returns (a short delay, a shutdown): data is handed over with
   * the call, not touched after it.  A timer whose continuation completes
   * a request in flight is never cancelled: the request keeps the handle
   * open.  Returns 0, or -1 with the error recorded, and then done never
   * runs. */
  int (*after) (const struct nbdhost_next *next, uint64_t nsec,
                void (*done) (void *data, int errnum), void *data);
  /* background: run job (next, data) once, on a thread of its own, as a
   * callback made for this connection but outside any request; it may
   * call every synchronous callback of next.  The filter's handle is not
   * closed while a job runs (close waits for it), so a long job polls
   * next->closing and returns once it says 1.  Refused with ENOTSUP
   * unless every layer below is NBDHOST_THREAD_MODEL_PARALLEL, since the
   * job's calls overlap the connection's requests, and with EINVAL outside
   * a client connection's callbacks (startup).  Returns 0, or -1 with the
   * error recorded, and then job never runs. */
  int (*background) (const struct nbdhost_next *next,
                     void (*job) (const struct nbdhost_next *next,
                                  void *data),
                     void *data);
  /* closing: 1 once the filter's handle is closing or the server is
   * shutting down, else 0. */
  int (*closing) (const struct nbdhost_next *next);
};

/* Opens the next layer during a filter's open callback: under a different
 * export name or read-only if the filter wants.  Returns 0, or -1 with the
 * error recorded. */
struct nbdhost_next_open {
  uint64_t struct_size;
  void *opaque;               /* the server's; do not touch */
  int (*open) (const struct nbdhost_next_open *self,
               int readonly, const char *export_name);
};

/* A filter.  Every callback may be NULL: the call then goes to the next
 * layer unchanged. */
struct nbdhost_filter {
  uint64_t struct_size;       /* sizeof (struct nbdhost_filter) */
  uint32_t abi_version;       /* NBDHOST_ABI_VERSION */
  uint32_t thread_model;      /* NBDHOST_THREAD_MODEL_* this filter tolerates */

  const char *name;
  const char *version;
  const char *description;
  const char *config_help;

  int (*load) (void);
  void (*unload) (void);
  /* Return NBDHOST_CONFIG_TAKEN, NBDHOST_CONFIG_PASS, or -1 on error. */
  int (*config) (const char *key, const char *value);
  int (*config_complete) (void);
  int (*get_ready) (void);
  int (*preconnect) (int readonly);

  /* Must call next->open exactly once on success.  Returns the filter's
   * handle (any non-NULL pointer, for example a static one), or NULL. */
  void *(*open) (const struct nbdhost_next_open *next, int readonly,
                 const char *export_name);
  void (*close) (void *handle);

  int64_t (*get_size) (const struct nbdhost_next *next, void *handle);
  int (*block_size) (const struct nbdhost_next *next, void *handle,
                     uint32_t *minimum, uint32_t *preferred, uint32_t *maximum);
  int (*can_write) (const struct nbdhost_next *next, void *handle);
  int (*can_flush) (const struct nbdhost_next *next, void *handle);
  int (*can_trim) (const struct nbdhost_next *next, void *handle);
  int (*can_zero) (const struct nbdhost_next *next, void *handle);
  int (*can_fast_zero) (const struct nbdhost_next *next, void *handle);
  int (*can_fua) (const struct nbdhost_next *next, void *handle);
  int (*can_multi_conn) (const struct nbdhost_next *next, void *handle);
  int (*can_cache) (const struct nbdhost_next *next, void *handle);
  int (*can_extents) (const struct nbdhost_next *next, void *handle);
  int (*is_rotational) (const struct nbdhost_next *next, void *handle);
  const char *(*export_description) (const struct nbdhost_next *next,
                                     void *handle);
  int (*pread) (const struct nbdhost_next *next, void *handle, void *buf,
                uint64_t count, uint64_t offset, uint32_t flags);
  int (*pwrite) (const struct nbdhost_next *next, void *handle,
                 const void *buf, uint64_t count, uint64_t offset,
                 uint32_t flags);
  int (*flush) (const struct nbdhost_next *next, void *handle,
                uint32_t flags);
  int (*trim) (const struct nbdhost_next *next, void *handle,
               uint64_t count, uint64_t offset, uint32_t flags);
  int (*zero) (const struct nbdhost_next *next, void *handle,
               uint64_t count, uint64_t offset, uint32_t flags);
  int (*extents) (const struct nbdhost_next *next, void *handle,
                  uint64_t count, uint64_t offset, uint32_t flags,
                  struct nbdhost_extents *extents);
  int (*cache) (const struct nbdhost_next *next, void *handle,
                uint64_t count, uint64_t offset, uint32_t flags);

  /* Since ABI 1.2.  Called once at start-up, after every layer's get_ready
   * and before the server accepts a connection, with the layer below opened
   * read-only on its default export; that handle is closed when the call
   * returns.  A filter that must look at the disk before serving (the luks
   * filter unlocks its key here) does it now, so that a mistake stops the
   * server with a message instead of failing every connection.  Returns 0,
   * or -1 with the error recorded: the server then exits. */
  int (*startup) (const struct nbdhost_next *next);

  /* Since ABI 1.4.  Called once after get_ready.  Returns
   * NBDHOST_NONBLOCKING if, as configured, the filter adds no waiting of
   * its own (no I/O, sleeps or blocking locks, and no long computation):
   * the chain is then as non-blocking as the layers below it.  Without the
   * bit, requests through this filter run on worker threads. */
  uint64_t (*capabilities) (void);

  /* Since ABI 1.5: as in struct nbdhost_plugin. */
  int (*configured_thread_model) (void);
  int (*after_fork) (void);

  /* Since ABI 1.6.  Called once for each handle, after open and after the
   * layers below have been opened and prepared, before the handle's first
   * request (or query such as get_size): the place to ask the layer below
   * about the export and act on the answer, which open, before that layer
   * is complete, cannot.  Returns 0, or -1 with the error recorded: the
   * handle is then closed and the client's open fails. */
  int (*prepare) (const struct nbdhost_next *next, void *handle,
                  int readonly);

  /* Since ABI 1.7.  What a client listing exports (NBD_OPT_LIST) sees, and
   * the name the empty export name stands for, as the plugin callbacks of
   * the same names, but with the layer below to ask: a filter may pass the
   * call down unchanged (NULL does that), rename, hide or add exports.
   * list_exports fills exports, for instance by calling
   * next->list_exports with it, or with a list of its own to read back;
   * the string default_export returns must stay valid until the next call
   * on the same thread. */
  int (*list_exports) (const struct nbdhost_next_exports *next,
                       int readonly, int is_tls,
                       struct nbdhost_exports *exports);
  const char *(*default_export) (const struct nbdhost_next_exports *next,
                                 int readonly, int is_tls);

  /* Since ABI 1.8.  Called once for each prepared handle when its
   * connection ends, before any layer of the chain is closed, top layer
   * first: the place to write back what the filter kept in memory for the
   * handle (a format filter's metadata), with the layer below still open.
   * Returns 0, or -1 with the error recorded, which is logged: the client
   * has gone. */
  int (*finalize) (const struct nbdhost_next *next, void *handle);

  /* Since ABI 1.8: as the plugin's local_file.  NULL passes the question
   * to the layer below; a filter whose bytes are not the file's in place
   * (an overlay that keeps writes elsewhere) may answer NULL itself. */
  const char *(*local_file) (const struct nbdhost_next *next, void *handle);

  /* Since ABI 1.9: asynchronous requests, as the plugin's, with the layer
   * below to pass them to (next->async_*).  A filter with nothing to do
   * after the layer below answers passes req itself down, so the request
   * stays asynchronous without a thread or a continuation; one that must
   * act on the result (decrypt a read, join the pieces of a split) passes
   * requests from host->request_then and completes req in their
   * continuations.  NULL: the synchronous callback runs instead (or the
   * request goes down unchanged when that is NULL too). */
  void (*async_pread) (const struct nbdhost_next *next, void *handle,
                       void *buf, uint64_t count, uint64_t offset,
                       uint32_t flags, struct nbdhost_request *req);
  void (*async_pwrite) (const struct nbdhost_next *next, void *handle,
                        const void *buf, uint64_t count, uint64_t offset,
                        uint32_t flags, struct nbdhost_request *req);
  void (*async_flush) (const struct nbdhost_next *next, void *handle,
                       uint32_t flags, struct nbdhost_request *req);
  void (*async_trim) (const struct nbdhost_next *next, void *handle,
                      uint64_t count, uint64_t offset, uint32_t flags,
                      struct nbdhost_request *req);
  void (*async_zero) (const struct nbdhost_next *next, void *handle,
                      uint64_t count, uint64_t offset, uint32_t flags,
                      struct nbdhost_request *req);
  void (*async_cache) (const struct nbdhost_next *next, void *handle,
                       uint64_t count, uint64_t offset, uint32_t flags,
                       struct nbdhost_request *req);
  void (*async_extents) (const struct nbdhost_next *next, void *handle,
                         uint64_t count, uint64_t offset, uint32_t flags,
                         struct nbdhost_extents *extents,
                         struct nbdhost_request *req);
};

typedef const struct nbdhost_filter *
  (*nbdhost_filter_entry_fn) (const struct nbdhost_host *host);

/* As NBDHOST_REGISTER_PLUGIN (nbdhost-plugin.h), for a filter's struct:
 * defines nbdhost_filter_entry, and nbdhost_error / nbdhost_debug work. */
#define NBDHOST_REGISTER_FILTER(filter)                                  \
  NBDHOST_EXPORT const struct nbdhost_filter *                           \
  nbdhost_filter_entry (const struct nbdhost_host *nbdhost_host_arg);    \
  NBDHOST_EXPORT const struct nbdhost_filter *                           \
  nbdhost_filter_entry (const struct nbdhost_host *nbdhost_host_arg)     \
  {                                                                      \
    if (nbdhost_host_arg == NULL ||                                      \
        nbdhost_host_arg->abi_version >> 16 != NBDHOST_ABI_MAJOR)        \
      return NULL;                                                       \
    nbdhost_host = nbdhost_host_arg;                                     \
    (filter).struct_size = sizeof (filter);                              \
    (filter).abi_version = NBDHOST_ABI_VERSION;                          \
    return &(filter);                                                    \
  }

/* Since ABI 1.5: the entry of an adapter, called with the foreign
 * filter's path. */
typedef const struct nbdhost_filter *
  (*nbdhost_filter_adapter_entry_fn) (const struct nbdhost_host *host,
                                      const char *path);

#ifdef __cplusplus
}
#endif

#endif /* NBDHOST_FILTER_H */
