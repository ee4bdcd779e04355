/* request.c -- the request table (request.h). Indexed by the Envelope's
 * body case, so finding a request is one array read; the cases are small
 * field numbers (VQKVD_BODY_CASES bounds them, as the metrics counters do).
 */
#include "request.h"

#include "server.h"

#define VQKVD__REQUEST(body, n, fn, fds, first)                                                    \
    [VQKV__ENVELOPE__BODY_##                                                                       \
        body] = {.name = n, .handle = fn, .takes_fds = fds, .before_hello = first}
#define VQKVD__REPLY(body, n) [VQKV__ENVELOPE__BODY_##body] = {.name = n}

static const vqkvd_request_t vqkvd__requests[VQKVD_BODY_CASES] = {
    VQKVD__REQUEST(HELLO, "Hello", vqkvd_client_hello, false, true),
    VQKVD__REQUEST(STATS, "Stats", vqkvd_client_stats, false, false),
    VQKVD__REQUEST(REGISTER_MODEL, "RegisterModel", vqkvd_session_register_model, true, false),
    VQKVD__REQUEST(REGISTER_REGION, "RegisterRegion", vqkvd_session_register_region, true, false),
    VQKVD__REQUEST(REGION_PIECES, "RegionPieces", vqkvd_session_region_pieces, true, false),
    VQKVD__REQUEST(FIND_MODEL, "FindModel", vqkvd_session_find_model, false, false),
    VQKVD__REQUEST(PUT, "Put", vqkvd_session_put, false, false),
    VQKVD__REQUEST(LOOKUP, "Lookup", vqkvd_session_lookup, false, false),
    VQKVD__REQUEST(GET, "Get", vqkvd_session_get, false, false),
    VQKVD__REQUEST(RELEASE, "Release", vqkvd_session_release, false, false),
    VQKVD__REQUEST(PIN, "Pin", vqkvd_session_pin, false, false),
    VQKVD__REQUEST(UNPIN, "Unpin", vqkvd_session_unpin, false, false),
    VQKVD__REQUEST(EVICT, "Evict", vqkvd_session_evict, false, false),
    VQKVD__REQUEST(FLUSH, "Flush", vqkvd_session_flush, false, false),
    VQKVD__REPLY(ERROR, "Error"),
    VQKVD__REPLY(WELCOME, "Welcome"),
    VQKVD__REPLY(MODEL_REGISTERED, "ModelRegistered"),
    VQKVD__REPLY(REGION_REGISTERED, "RegionRegistered"),
    VQKVD__REPLY(PUT_DONE, "PutDone"),
    VQKVD__REPLY(LOOKUP_RESULT, "LookupResult"),
    VQKVD__REPLY(GET_DONE, "GetDone"),
    VQKVD__REPLY(ACK, "Ack"),
    VQKVD__REPLY(STATS_REPLY, "StatsReply"),
};

const vqkvd_request_t *vqkvd_request_of(int body_case)
{
    static const vqkvd_request_t unknown = {.name = "nothing"};
    if (body_case < 0 || body_case >= VQKVD_BODY_CASES || vqkvd__requests[body_case].name == NULL)
        return &unknown;
    return &vqkvd__requests[body_case];
}
