/* A plugin that says which connection each call is made for: a read
 * returns the text "open=NAME pread=NAME peer=PEER", the export name the
 * open saw (the pointer kept from open, which the ABI promises lives as
 * long as the connection), the one the read sees, and the client's
 * address as the read sees it ("unix" for a Unix-socket client), padded
 * with zeroes to the disk's 4096 bytes. */
#include <arpa/inet.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <netinet/in.h>
#include <nbdhost-plugin.h>

#define SIZE 4096

static void *
who_open (int readonly)
{
  /* Kept, not copied: valid until close. */
  const char *name = nbdhost_host->export_name ();
  return (void *) (name ? name : "(null)");
}

static int64_t
who_get_size (void *handle)
{
  return SIZE;
}

/* The peer as the current call sees it. */
static void
peer (char *out, size_t len)
{
  struct sockaddr_storage ss;
  socklen_t sslen = sizeof ss;
  char addr[INET6_ADDRSTRLEN] = "";

  memset (&ss, 0, sizeof ss);
  if (nbdhost_host->peer_name ((struct sockaddr *) &ss, &sslen) == -1) {
    snprintf (out, len, "none");
    return;
  }
  switch (ss.ss_family) {
  case AF_UNIX:
    snprintf (out, len, "unix");
    break;
  case AF_INET:
    inet_ntop (AF_INET, &((struct sockaddr_in *) &ss)->sin_addr,
               addr, sizeof addr);
    snprintf (out, len, "%s", addr);
    break;
  case AF_INET6:
    inet_ntop (AF_INET6, &((struct sockaddr_in6 *) &ss)->sin6_addr,
               addr, sizeof addr);
    snprintf (out, len, "%s", addr);
    break;
  default:
    snprintf (out, len, "family %d", ss.ss_family);
  }
}

static int
who_pread (void *handle, void *buf, uint64_t count, uint64_t offset,
           uint32_t flags)
{
  char text[SIZE], who[64];
  const char *name = nbdhost_host->export_name ();
  size_t len;

  peer (who, sizeof who);
  memset (text, 0, sizeof text);
  snprintf (text, sizeof text, "open=%s pread=%s peer=%s",
            (const char *) handle, name ? name : "(null)", who);
  len = strlen (text);
  for (uint64_t i = 0; i < count; i++)
    ((char *) buf)[i] = offset + i < len ? text[offset + i] : 0;
  return 0;
}

static struct nbdhost_plugin plugin = {
  .thread_model = NBDHOST_THREAD_MODEL_PARALLEL,
  .name = "whoami",
  .version = "1.0",
  .description = "reads say which connection they are made for",
  .open = who_open,
  .get_size = who_get_size,
  .pread = who_pread,
};

NBDHOST_REGISTER_PLUGIN (plugin)
