/* The printf-style functions of nbdkit's plugin API.  Stable Rust cannot
 * define variadic functions, so they are written here; each formats its
 * message and hands the result to the Rust side.  The names plugins call
 * (nbdkit_error, ...) are exported by variadic.rs, which jumps here with
 * the caller's registers and stack untouched.
 *
 * Like nbdkit's own, these keep errno as they found it, and a "%m" in the
 * format expands to strerror (errno) (glibc's vasprintf does that). */
#define _GNU_SOURCE
#include <errno.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>

/* Defined in Rust (services.rs). */
void nbdhost_nbdkit_error_message (const char *msg);
void nbdhost_nbdkit_debug_message (const char *msg);
const char *nbdhost_nbdkit_intern (const char *str, size_t len);

/* The formatted message, or NULL if there is no memory for it. */
static char *
format (const char *fs, va_list args)
{
  char *s;

  if (vasprintf (&s, fs, args) == -1)
    return NULL;
  return s;
}

void
nbdhost_nbdkit_verror (const char *fs, va_list args)
{
  int err = errno;
  char *s = format (fs, args);

  nbdhost_nbdkit_error_message (s ? s : fs);
  free (s);
  errno = err;
}

void
nbdhost_nbdkit_error (const char *fs, ...)
{
  va_list args;

  va_start (args, fs);
  nbdhost_nbdkit_verror (fs, args);
  va_end (args);
}

void
nbdhost_nbdkit_vdebug (const char *fs, va_list args)
{
  int err = errno;
  char *s = format (fs, args);

  nbdhost_nbdkit_debug_message (s ? s : fs);
  free (s);
  errno = err;
}

void
nbdhost_nbdkit_debug (const char *fs, ...)
{
  va_list args;

  va_start (args, fs);
  nbdhost_nbdkit_vdebug (fs, args);
  va_end (args);
}

const char *
nbdhost_nbdkit_vprintf_intern (const char *fs, va_list args)
{
  char *s = format (fs, args);
  const char *r;

  if (s == NULL) {
    nbdhost_nbdkit_error ("asprintf: %m");
    return NULL;
  }
  r = nbdhost_nbdkit_intern (s, (size_t) -1);
  free (s);
  return r;
}

const char *
nbdhost_nbdkit_printf_intern (const char *fs, ...)
{
  va_list args;
  const char *r;

  va_start (args, fs);
  r = nbdhost_nbdkit_vprintf_intern (fs, args);
  va_end (args);
  return r;
}
