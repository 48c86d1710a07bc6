/* LD_PRELOAD shim for fio's nbd engine (benches/tls.sh).
 *
 * libnbd refuses URI parameters that name local files (tls-certificates=,
 * tls-psk-file=) unless the client calls nbd_set_uri_allow_local_file;
 * nbdcopy and nbdinfo do, fio's nbd engine (3.33) does not, and as root
 * libnbd's only default certificate directory is /etc/pki/libnbd.  This
 * wraps nbd_create to allow them on every handle, so fio can connect with
 * nbds+unix:///?socket=S&tls-certificates=DIR.  Nothing else changes: the
 * I/O path is fio's and libnbd's own.
 *
 *   cc -O2 -shared -fPIC -o nbd_allow_local.so nbd_allow_local.c -ldl
 *   LD_PRELOAD=./nbd_allow_local.so fio --ioengine=nbd --uri='nbds+unix:///?...'
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdbool.h>
#include <stddef.h>

struct nbd_handle;

struct nbd_handle *nbd_create(void)
{
    struct nbd_handle *(*real)(void) =
        (struct nbd_handle * (*)(void)) dlsym(RTLD_NEXT, "nbd_create");
    int (*allow)(struct nbd_handle *, bool) =
        (int (*)(struct nbd_handle *, bool)) dlsym(RTLD_NEXT, "nbd_set_uri_allow_local_file");
    struct nbd_handle *h = real ? real() : NULL;

    if (h && allow)
        allow(h, true);
    return h;
}
