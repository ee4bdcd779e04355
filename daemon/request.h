/* request.h -- the table of what a client may send vqkvd: for each body of
 * the Envelope, its name as vqkv.proto spells it, its handler, and the two
 * rules server.c applies before the handler runs (whether it may carry
 * file descriptors, whether it may come before Hello). The dispatcher, the
 * "takes no file descriptors" check and the names in log lines and errors
 * all read this one table; the metrics endpoint names its counters from
 * the Envelope's own descriptor.
 */
#ifndef VQKVD_REQUEST_H
#define VQKVD_REQUEST_H

#include <stdbool.h>

#include "session.h"

typedef void (*vqkvd_request_fn)(vqkvd_client_t *c, const Vqkv__Envelope *req, vqkv_frame_t *frame);

typedef struct {
    const char *name;        /* "Put"; "nothing" for a body outside the protocol */
    vqkvd_request_fn handle; /* NULL: a reply type, which no client sends */
    bool takes_fds;          /* may carry fds, and checks their count itself */
    bool before_hello;       /* may be a connection's first request */
} vqkvd_request_t;

/* The entry of an Envelope body case; never NULL (an unknown case gets an
 * entry with no handler). O(1). */
const vqkvd_request_t *vqkvd_request_of(int body_case);

#endif
